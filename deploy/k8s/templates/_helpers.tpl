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

{{/* The Redis every component uses: the external URL, else the chart's StatefulSet (TLS when
redis.tls.enabled). Never with a login in it: that comes from the Secret (dapo.redisEnv). */}}
{{- define "dapo.redisUrl" -}}
{{- if .Values.redis.external.url }}
{{- .Values.redis.external.url }}
{{- else }}
{{- $scheme := ternary "rediss" "redis" .Values.redis.tls.enabled }}
{{- printf "%s://%s:%d/0" $scheme (include "dapo.componentName" (dict "root" . "component" "redis")) (int .Values.redis.port) }}
{{- end }}
{{- end }}

{{/* TCP port of the Redis the clients dial (the external URL's, default 6379). */}}
{{- define "dapo.redisPort" -}}
{{- if .Values.redis.external.url }}
{{- $hostport := regexReplaceAll "[/?].*$" (regexReplaceAll "^[a-z]+://" .Values.redis.external.url "") "" }}
{{- default "6379" (regexFind "[0-9]+$" (regexFind ":[0-9]+$" $hostport)) }}
{{- else }}
{{- .Values.redis.port }}
{{- end }}
{{- end }}

{{- define "dapo.redisSecretName" -}}
{{- default (include "dapo.componentName" (dict "root" . "component" "redis-auth")) .Values.redis.auth.existingSecret }}
{{- end }}

{{/* Where clients find the CA that verifies Redis's certificate. */}}
{{- define "dapo.redisCaDir" -}}/var/run/secrets/dapo/redis-tls{{- end }}

{{/* Redis URL and login of a client container: the password only as a secretKeyRef. */}}
{{- define "dapo.redisEnv" -}}
{{- $auth := .Values.redis.auth }}
- name: DAPO_REDIS_URL
  value: {{ include "dapo.redisUrl" . | quote }}
- name: DAPO_REDIS_PASSWORD
  {{- include "dapo.redisPasswordRef" . | nindent 2 }}
{{- with $auth.username }}
- name: DAPO_REDIS_USERNAME
  value: {{ . | quote }}
{{- end }}
{{- if .Values.redis.tls.enabled }}
- name: DAPO_REDIS_TLS_CA
  value: {{ printf "%s/ca.crt" (include "dapo.redisCaDir" .) | quote }}
{{- end }}
{{- end }}

{{/* valueFrom of the Redis password, from the Secret. */}}
{{- define "dapo.redisPasswordRef" -}}
valueFrom:
  secretKeyRef:
    name: {{ include "dapo.redisSecretName" . }}
    key: {{ .Values.redis.auth.passwordKey }}
{{- end }}

{{/* The CA volume and mount of a Redis client (nothing without TLS). */}}
{{- define "dapo.redisCaVolumes" -}}
{{- if .Values.redis.tls.enabled }}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.tls.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.redis.tls.caKey }}
        path: ca.crt
{{- end }}
{{- end }}

{{- define "dapo.redisCaMounts" -}}
{{- if .Values.redis.tls.enabled }}
- name: redis-ca
  mountPath: {{ include "dapo.redisCaDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Bytes of a Kubernetes quantity (3Gi, 512M, 1.5Gi, 4294967296). */}}
{{- define "dapo.bytes" -}}
{{- if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) }}
{{- printf "%.0f" (float64 .) }}
{{- else }}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" . }}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- $unit := trimPrefix $num . }}
{{- if not (hasKey $units $unit) }}
{{- fail (printf "unsupported memory quantity %q (use k, M, G, T, Ki, Mi, Gi or Ti)" .) }}
{{- end }}
{{- printf "%.0f" (mulf (float64 $num) (index $units $unit)) }}
{{- end }}
{{- end }}

{{/* Value combinations the schema cannot refuse: each fails the render with its reason. */}}
{{- define "dapo.checkValues" -}}
{{- $r := .Values.redis }}
{{- if and $r.external.url (not $r.auth.existingSecret) }}
{{- fail "redis.external.url needs redis.auth.existingSecret: the Secret with that Redis's password" }}
{{- end }}
{{- if and $r.tls.enabled (not $r.tls.existingSecret) }}
{{- fail "redis.tls.enabled needs redis.tls.existingSecret: the Secret with the CA (and, in-cluster, the server's certificate)" }}
{{- end }}
{{- if and $r.tls.enabled $r.external.url (not (hasPrefix "rediss://" $r.external.url)) }}
{{- fail "redis.tls.enabled needs a rediss:// redis.external.url" }}
{{- end }}
{{- $limit := dig "limits" "memory" "" $r.resources }}
{{- if and (not $r.external.url) $limit }}
{{- if le (float64 (include "dapo.bytes" $limit)) (float64 (include "dapo.bytes" $r.maxmemory)) }}
{{- fail (printf "redis.resources.limits.memory (%v) must exceed redis.maxmemory (%v)" $limit $r.maxmemory) }}
{{- end }}
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
{{ include "dapo.redisEnv" .root }}
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

{{/* The learner's headless Service: its pods' stable DNS names. */}}
{{- define "dapo.learnerHeadless" -}}
{{- printf "%s-headless" (include "dapo.componentName" (dict "root" . "component" "learner")) }}
{{- end }}

{{/* DNS suffix of the learner pods' names (DAPO_SYNC_HOST), as rollout pods accept it. */}}
{{- define "dapo.syncAllowedHosts" -}}
{{- printf ".%s.%s.svc.%s" (include "dapo.learnerHeadless" .) .Release.Namespace .Values.clusterDomain }}
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
