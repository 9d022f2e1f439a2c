{{- define "writ.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "writ.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "writ.labels" -}}
app.kubernetes.io/name: {{ include "writ.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "writ.selectorLabels" -}}
app.kubernetes.io/name: {{ include "writ.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end -}}

{{- define "writ.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "writ.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "writ.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}
{{- end -}}

{{- define "writ.redisImage" -}}
{{- $i := .Values.redis.internal.image -}}
{{- if $i.digest -}}
{{- printf "%s@%s" $i.repository $i.digest -}}
{{- else -}}
{{- printf "%s:%s" $i.repository $i.tag -}}
{{- end -}}
{{- end -}}

{{- define "writ.signingSecret" -}}
{{- default (printf "%s-signing-keys" (include "writ.fullname" .)) .Values.signingKeys.existingSecret -}}
{{- end -}}

{{- define "writ.adminSecret" -}}
{{- default (printf "%s-admin-tokens" (include "writ.fullname" .)) .Values.adminTokens.existingSecret -}}
{{- end -}}

{{- define "writ.redisUrl" -}}
{{- if .Values.redis.internal.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "writ.fullname" .) -}}
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{- /* The Secret holding the Redis credential, or "" when there is none. */ -}}
{{- define "writ.redisSecretName" -}}
{{- if .Values.redis.existingSecret -}}
{{- .Values.redis.existingSecret -}}
{{- else if .Values.redis.auth.password -}}
{{- printf "%s-redis-auth" (include "writ.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "writ.redisSecretKey" -}}
{{- if .Values.redis.existingSecret -}}
{{- .Values.redis.existingSecretKey -}}
{{- else -}}
password-urlencoded
{{- end -}}
{{- end -}}

{{- /* "url" when the Secret holds the whole URL, "password" when it holds the password. */ -}}
{{- define "writ.redisSecretHolds" -}}
{{- if .Values.redis.existingSecret -}}
{{- .Values.redis.existingSecretKeyType -}}
{{- else -}}
password
{{- end -}}
{{- end -}}

{{- /* A Redis URL with the password the kubelet expands from $(WRIT_REDIS_PASSWORD); an ACL
user already in the URL is kept. */ -}}
{{- define "writ.withRedisPassword" -}}
{{- regexReplaceAll "^(rediss?)://(?:([^:@/]*)@)?" . "${1}://${2}:$$(WRIT_REDIS_PASSWORD)@" -}}
{{- end -}}

{{- /* The container's Redis credential variables: the URL from the Secret, or the password
(expanded by the kubelet into WRIT_STORE__URL / WRIT_STORE__NODES, defined after it). */ -}}
{{- define "writ.redisEnv" -}}
{{- $name := include "writ.redisSecretName" . -}}
{{- if $name -}}
{{- if eq (include "writ.redisSecretHolds" .) "url" -}}
# The Redis URL, credential included, from the Secret (never in the ConfigMap).
- name: WRIT_STORE__URL
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: {{ include "writ.redisSecretKey" . }}
{{- else -}}
# The Redis password (URL-encoded) from the Secret, added to the URL(s) below.
- name: WRIT_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: {{ include "writ.redisSecretKey" . }}
{{- if .Values.redis.clusterNodes }}
- name: WRIT_STORE__NODES
  value: {{ printf "[%s]" (join ", " (include "writ.redisNodesWithPassword" . | fromJsonArray)) | quote }}
{{- else }}
- name: WRIT_STORE__URL
  value: {{ include "writ.withRedisPassword" (include "writ.redisUrl" .) | quote }}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "writ.redisNodesWithPassword" -}}
{{- $out := list -}}
{{- range .Values.redis.clusterNodes -}}
{{- $out = append $out (include "writ.withRedisPassword" . | quote) -}}
{{- end -}}
{{- $out | toJson -}}
{{- end -}}

{{/* The Workload API endpoint of the mounted SPIRE agent socket (unix:///...). */}}
{{- define "writ.workloadApiSocket" -}}
{{- printf "unix://%s/%s" (trimSuffix "/" .Values.spiffe.workloadApi.mountPath) .Values.spiffe.workloadApi.socketName -}}
{{- end -}}

{{/* Trust domains with a bundle file (ConfigMap), and bundle endpoints with an extra CA. */}}
{{- define "writ.bundleFileDomains" -}}
{{- range .Values.spiffe.trustDomains }}{{ if .bundleConfigMap }}{{ .name }} {{ end }}{{ end -}}
{{- end -}}
{{- define "writ.federationCaDomains" -}}
{{- range .Values.spiffe.trustDomains }}{{ if and .bundleEndpoint .bundleEndpoint.caConfigMap }}{{ .name }} {{ end }}{{ end -}}
{{- end -}}
