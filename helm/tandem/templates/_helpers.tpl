{{/* Names ---------------------------------------------------------------------------------------------------- */}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-tandem, or the release name when it already contains the chart name; at most 63 characters. */}}
{{- define "tandem.fullname" -}}
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

{{/* Name of one component's objects: (dict "root" $ "component" "prefill") -> <fullname>-prefill. */}}
{{- define "tandem.componentName" -}}
{{- printf "%s-%s" (include "tandem.fullname" .root | trunc 50 | trimSuffix "-") .component }}
{{- end }}

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tandem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tandem.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Labels ---------------------------------------------------------------------------------------------------- */}}

{{/* (dict "root" $ "component" "router") */}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ include "tandem.chart" .root }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: tandem
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of objects that belong to no single component (ServiceAccount, rules, dashboards). */}}
{{- define "tandem.chartLabels" -}}
helm.sh/chart: {{ include "tandem.chart" . }}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tandem
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Redis ----------------------------------------------------------------------------------------------------- */}}

{{- define "tandem.redis.url" -}}
{{- printf "redis://%s:%d/0" (include "tandem.componentName" (dict "root" . "component" "redis")) (int .Values.redis.port) }}
{{- end }}

{{/* The Secret holding an external Redis URL (the user's, or the one this chart creates from redis.external.url). */}}
{{- define "tandem.redis.secretName" -}}
{{- default (include "tandem.componentName" (dict "root" . "component" "redis-url")) .Values.redis.external.existingSecret }}
{{- end }}

{{- define "tandem.redis.validate" -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) }}
{{- fail "redis.enabled is false: set redis.external.url or redis.external.existingSecret" }}
{{- end }}
{{- end }}

{{/* Flags every router and worker takes: where Redis is, which model, which cache. */}}
{{- define "tandem.sharedArgs" -}}
- --namespace
- {{ .Values.redis.keyPrefix | quote }}
{{- if .Values.redis.enabled }}
- --redis-url
- {{ include "tandem.redis.url" . | quote }}
{{- end }}
- --model
- {{ .Values.model.name | quote }}
- --download-dir
- {{ .Values.model.cache.mountPath | quote }}
- --transport
- {{ .Values.transport | quote }}
{{- end }}

{{/* Environment every router and worker gets: writable HOME and caches, secrets. */}}
{{- define "tandem.sharedEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: {{ .Values.model.cache.mountPath | quote }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.model.cache.mountPath | quote }}
- name: TRITON_CACHE_DIR
  value: {{ printf "%s/triton" .Values.model.cache.mountPath | quote }}
- name: PYTHONUNBUFFERED
  value: "1"
{{- if not .Values.redis.enabled }}
- name: TANDEM_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.redis.secretName" . }}
      key: {{ ternary .Values.redis.external.existingSecretKey "redis-url" (ne .Values.redis.external.existingSecret "") }}
{{- end }}
{{- with .Values.model.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.model.hfToken.key }}
{{- end }}
{{- end }}

{{/* Volumes every router and worker mounts: /tmp, the model cache, the optional model volume. */}}
{{- define "tandem.sharedVolumes" -}}
- name: tmp
  emptyDir: {}
- name: model-cache
{{- if .Values.model.cache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.cache.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.cache.sizeLimit }}
{{- end }}
{{- if .Values.model.volume.existingClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.model.volume.existingClaim }}
    readOnly: {{ .Values.model.volume.readOnly }}
{{- end }}
{{- end }}

{{- define "tandem.sharedVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: model-cache
  mountPath: {{ .Values.model.cache.mountPath }}
{{- if .Values.model.volume.existingClaim }}
- name: models
  mountPath: {{ .Values.model.volume.mountPath }}
  readOnly: {{ .Values.model.volume.readOnly }}
  {{- with .Values.model.volume.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Pod annotations that roll the pods when a Secret the chart owns changes. */}}
{{- define "tandem.checksumAnnotations" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.external.url (not .Values.redis.external.existingSecret) }}
checksum/redis-url: {{ .Values.redis.external.url | sha256sum }}
{{- end }}
{{- end }}

{{/* A PodDisruptionBudget's spec: (dict "root" $ "spec" .Values.prefill.pdb) -> its minAvailable or maxUnavailable. */}}
{{- define "tandem.pdbBudget" -}}
{{- $min := .spec.minAvailable }}
{{- $max := .spec.maxUnavailable }}
{{- if and (kindIs "invalid" $min) (kindIs "invalid" $max) }}
{{- fail "pdb: set one of minAvailable and maxUnavailable" }}
{{- else if and (not (kindIs "invalid" $min)) (not (kindIs "invalid" $max)) }}
{{- fail "pdb: set only one of minAvailable and maxUnavailable (null the other)" }}
{{- else if kindIs "invalid" $max }}
minAvailable: {{ $min }}
{{- else }}
maxUnavailable: {{ $max }}
{{- end }}
{{- end }}

{{/* Planner ---------------------------------------------------------------------------------------------------- */}}

{{- define "tandem.planner.validate" -}}
{{- $p := .Values.planner }}
{{- range $pool := list "prefill" "decode" }}
{{- if (index $.Values $pool).autoscaling.enabled }}
{{- fail (printf "planner.enabled and %s.autoscaling.enabled are both on: the planner and the autoscaler would fight over the %s replicas; turn one off" $pool $pool) }}
{{- end }}
{{- $limits := index $p $pool }}
{{- if gt (int $limits.minReplicas) (int $limits.maxReplicas) }}
{{- fail (printf "planner.%s.minReplicas (%d) must not exceed planner.%s.maxReplicas (%d)" $pool (int $limits.minReplicas) $pool (int $limits.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if and (empty $p.profile.json) (not $p.profile.existingConfigMap) }}
{{- fail "planner.enabled: set planner.profile.json (the capacity profile) or planner.profile.existingConfigMap" }}
{{- end }}
{{- end }}

{{/* A value given as an object or as JSON text, as JSON text (a string is taken as written). */}}
{{- define "tandem.jsonText" -}}
{{- if kindIs "string" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* The inline profile as JSON text (a string value is taken as written). */}}
{{- define "tandem.planner.profileJson" -}}
{{- $json := .Values.planner.profile.json }}
{{- if kindIs "string" $json }}{{ $json }}{{ else }}{{ toJson $json }}{{ end }}
{{- end }}

{{- define "tandem.planner.image" -}}
{{- $i := .Values.planner.image }}
{{- printf "%s:%s" (default .Values.image.repository $i.repository) (default (default .Chart.AppVersion .Values.image.tag) $i.tag) }}
{{- end }}
