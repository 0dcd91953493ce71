{{/*
Pieces of the NetworkPolicies (networkpolicy.yaml), built as objects and written with toYaml.
Ports are numbers, not names: an egress rule's named port would be resolved against pods the
policy does not select.
*/}}

{{/* A peer that is the pods of one component of this release: (dict "root" $ "component" "x") */}}
{{- define "dapo.np.podPeer" -}}
podSelector:
  matchLabels:
    {{- include "dapo.selectorLabels" . | nindent 4 }}
{{- end }}

{{/* One TCP port, or a range: (dict "port" 1 "endPort" 2) */}}
{{- define "dapo.np.tcp" -}}
port: {{ .port }}
{{- with .endPort }}
endPort: {{ . }}
{{- end }}
protocol: TCP
{{- end }}

{{/* Egress every Redis client needs: DNS, and Redis (its in-cluster pods, or the external
one: the peers of networkPolicy.externalRedis, else any address on its port). A list. */}}
{{- define "dapo.np.baseEgress" -}}
{{- $np := .Values.networkPolicy }}
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
  {{- with $np.dns }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
- ports:
    - {port: {{ include "dapo.redisPort" . }}, protocol: TCP}
  {{- if not .Values.redis.external.url }}
  to:
    - {{- include "dapo.np.podPeer" (dict "root" . "component" "redis") | nindent 6 }}
  {{- else if $np.externalRedis }}
  to:
    {{- toYaml $np.externalRedis | nindent 4 }}
  {{- end }}
{{- end }}

{{/* The metrics port of a worker from the Prometheus peers of the values; [] = no rule. */}}
{{- define "dapo.np.metricsIngress" -}}
{{- with .Values.networkPolicy.prometheus }}
- from:
    {{- toYaml . | nindent 4 }}
  ports:
    - {port: {{ $.Values.healthPort }}, protocol: TCP}
{{- else }}
[]
{{- end }}
{{- end }}

{{/* One component's policy: (dict "root" $ "component" "x" "ingress" list "egress" list) */}}
{{- define "dapo.np.policy" -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "dapo.componentName" . }}
  labels:
    {{- include "dapo.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "dapo.selectorLabels" . | nindent 6 }}
  policyTypes: [Ingress, Egress]
  ingress:
    {{- toYaml .ingress | nindent 4 }}
  egress:
    {{- toYaml .egress | nindent 4 }}
{{- end }}
