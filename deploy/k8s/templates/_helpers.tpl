{{/*
Names, labels and the pieces every component's pod shares.
*/}}

{{- define "dapo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dapo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dapo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of a component's objects: (dict "root" $ "component" "rollout") */}}
{{- define "dapo.componentName" -}}
{{- printf "%s-%s" (include "dapo.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dapo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dapo.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "dapo.labels" -}}
helm.sh/chart: {{ include "dapo.chart" .root }}
{{ include "dapo.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: dapo
{{- end }}

{{/* Labels of objects that belong to the release but to no single component. */}}
{{- define "dapo.releaseLabels" -}}
helm.sh/chart: {{ include "dapo.chart" . }}
app.kubernetes.io/name: {{ include "dapo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dapo
{{- end }}

{{/* The Redis every component uses: the external URL, else the chart's StatefulSet. */}}
{{- define "dapo.redisUrl" -}}
{{- if .Values.redis.external.url }}
{{- .Values.redis.external.url }}
{{- else }}
{{- printf "redis://%s:%d/0" (include "dapo.componentName" (dict "root" . "component" "redis")) (int .Values.redis.port) }}
{{- end }}
{{- end }}

{{/* Image reference: (dict "root" $ "kind" "gpu") */}}
{{- define "dapo.image" -}}
{{- $img := index .root.Values.image .kind }}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag) }}
{{- end }}

{{- define "dapo.apiSecretName" -}}
{{- default (include "dapo.componentName" (dict "root" . "component" "api-token")) .Values.api.auth.existingSecret }}
{{- end }}

{{- define "dapo.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "dapo.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .Values.readOnlyRootFilesystem }}
capabilities:
  drop: [ALL]
{{- end }}

{{/* Pod-level fields every component shares (imagePullSecrets, service links off, ...). */}}
{{- define "dapo.podCommon" -}}
automountServiceAccountToken: false
# Service links would inject <SERVICE>_PORT variables; a Service named "dapo" would set
# DAPO_PORT and break the settings of the API.
enableServiceLinks: false
securityContext:
  {{- include "dapo.podSecurityContext" . | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* nodeSelector, tolerations, affinity of a component's values. */}}
{{- define "dapo.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Writable scratch for a read-only root: /tmp and the caches. */}}
{{- define "dapo.scratchEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /cache/xdg
- name: HF_HOME
  value: /cache/huggingface
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRITON_CACHE_DIR
  value: /cache/triton
- name: TORCHINDUCTOR_CACHE_DIR
  value: /cache/inductor
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
{{- end }}

{{- define "dapo.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir: {}
{{- end }}

{{- define "dapo.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
{{- end }}

{{/* Claim name of a shared volume: (dict "root" $ "volume" "models") */}}
{{- define "dapo.claimName" -}}
{{- $v := index .root.Values.persistence .volume }}
{{- default (include "dapo.componentName" (dict "root" .root "component" .volume)) $v.existingClaim }}
{{- end }}

{{/* Shared volumes of a pod: (dict "root" $ "volumes" (list "models" "data")) */}}
{{- define "dapo.sharedVolumes" -}}
{{- range .volumes }}
{{- if (index $.root.Values.persistence .).enabled }}
- name: {{ . }}
  persistentVolumeClaim:
    claimName: {{ include "dapo.claimName" (dict "root" $.root "volume" .) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Mounts of shared volumes: (dict "root" $ "volumes" (list ...) "writable" (list "checkpoints")) */}}
{{- define "dapo.sharedMounts" -}}
{{- $writable := default (list) .writable }}
{{- range .volumes }}
{{- $v := index $.root.Values.persistence . }}
{{- if $v.enabled }}
- name: {{ . }}
  mountPath: {{ $v.mountPath }}
  readOnly: {{ not (has . $writable) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Shared memory for NCCL and the inference engine. */}}
{{- define "dapo.shmVolume" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . }}
{{- end }}

{{/* DAPO_* settings every worker service (sampler, reward, rollout, learner) reads:
(dict "root" $ "c" .Values.rollout) */}}
{{- define "dapo.workerEnv" -}}
- name: DAPO_REDIS_URL
  value: {{ include "dapo.redisUrl" .root | quote }}
- name: DAPO_RUN_ID
  value: {{ .root.Values.runId | quote }}
- name: DAPO_HEALTH_HOST
  value: "0.0.0.0"
- name: DAPO_HEALTH_PORT
  value: {{ .root.Values.healthPort | quote }}
- name: DAPO_LOG_LEVEL
  value: {{ .root.Values.logLevel | quote }}
- name: DAPO_DEVICE
  value: {{ .c.device | quote }}
- name: DAPO_THREADS
  value: {{ .c.threads | quote }}
- name: DAPO_CACHE_DIR
  value: {{ .root.Values.cacheDir | quote }}
{{ include "dapo.scratchEnv" .root }}
{{- end }}

{{/* Probes on the health endpoints: (dict "port" "metrics") */}}
{{- define "dapo.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
readinessProbe:
  httpGet:
    path: /readyz
    port: {{ .port }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
{{- end }}

{{/* Headless Service that gives Prometheus a component's metrics port. */}}
{{- define "dapo.metricsService" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "dapo.componentName" . }}-metrics
  labels:
    {{- include "dapo.labels" . | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- include "dapo.selectorLabels" . | nindent 4 }}
  ports:
    - name: metrics
      port: {{ .root.Values.healthPort }}
      targetPort: metrics
      protocol: TCP
{{- end }}
