{{/*
One worker pool's Deployment: (dict "root" $ "component" "prefill"|"decode").
The pool's values are .Values.<component>. A worker registers itself in Redis once its model is loaded and
deregisters on SIGTERM before it drains, so the pod needs no Service for routing: its headless Service only
gives it DNS and a scrape target.
*/}}
{{- define "tandem.worker.deployment" -}}
{{- $root := .root }}
{{- $w := index $root.Values .component }}
{{- if le (float64 $w.terminationGracePeriodSeconds) (float64 $w.drainTimeoutSeconds) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must exceed %s.drainTimeoutSeconds (%v): Kubernetes would kill draining workers" .component $w.terminationGracePeriodSeconds .component $w.drainTimeoutSeconds) }}
{{- end }}
{{- if and (eq .component "prefill") $w.speculativeConfig }}
{{- fail "prefill.speculativeConfig: prefill workers never speculate (they sample one token); set decode.speculativeConfig" }}
{{- end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "tandem.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "tandem.labels" . | nindent 4 }}
spec:
  {{- /* An autoscaler or the planner owns replicas when on: an upgrade must not reset them. */}}
  {{- if not (or $w.autoscaling.enabled $root.Values.planner.enabled) }}
  replicas: {{ $w.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "tandem.selectorLabels" . | nindent 6 }}
  {{- with $w.strategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "tandem.labels" . | nindent 8 }}
        {{- with $w.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $annotations := include "tandem.checksumAnnotations" $root }}
      {{- if or $annotations $w.podAnnotations }}
      annotations:
        {{- with $annotations }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with $w.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "tandem.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
      # Service links would put <SERVICE>_PORT=tcp://... variables, some named TANDEM_*, into the environment.
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.runtimeClassName }}
      runtimeClassName: {{ . }}
      {{- end }}
      {{- with $w.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      terminationGracePeriodSeconds: {{ $w.terminationGracePeriodSeconds }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ .component }}
          image: {{ include "tandem.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args:
            - {{ .component }}
            - --host
            - "0.0.0.0"
            - --port
            - {{ $w.port | quote }}
            - --advertise-host
            - "$(POD_IP)"
            - --worker-id
            - "$(POD_NAME)"
            - --metrics-port
            - {{ $w.metricsPort | quote }}
            - --drain-timeout-s
            - {{ $w.drainTimeoutSeconds | quote }}
            {{- include "tandem.sharedArgs" $root | nindent 12 }}
            - --dtype
            - {{ $root.Values.model.dtype | quote }}
            - --load-format
            - {{ $root.Values.model.loadFormat | quote }}
            - --kv-cache-dtype
            - {{ $root.Values.model.kvCacheDtype | quote }}
            {{- with $root.Values.model.quantization }}
            - --quantization
            - {{ . | quote }}
            {{- end }}
            - --tensor-parallel-size
            - {{ $w.tensorParallelSize | int | quote }}
            {{- with $root.Values.model.maxModelLen }}
            - --max-model-len
            - {{ . | quote }}
            {{- end }}
            - --gpu-memory-utilization
            - {{ $w.gpuMemoryUtilization | quote }}
            {{- with $w.kvCacheMemory }}
            - --kv-cache-memory
            - {{ . | quote }}
            {{- end }}
            {{- with $w.maxNumSeqs }}
            - --max-num-seqs
            - {{ . | quote }}
            {{- end }}
            {{- with $w.maxNumBatchedTokens }}
            - --max-num-batched-tokens
            - {{ . | quote }}
            {{- end }}
            {{- with $w.speculativeConfig }}
            - --speculative-config
            - {{ include "tandem.jsonText" . | quote }}
            {{- end }}
            {{- range $w.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          env:
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            - name: POD_IP
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
            {{- include "tandem.sharedEnv" $root | nindent 12 }}
            {{- with $w.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- with $w.extraEnvFrom }}
          envFrom:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $w.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $w.metricsPort }}
              protocol: TCP
          # Startup: grpc.health.v1 answers SERVING once the model is loaded and the gRPC server is up.
          startupProbe:
            grpc:
              port: {{ $w.port }}
            {{- toYaml $w.probes.startup | nindent 12 }}
          # Ready: loaded, registered in Redis and not draining (the metrics server's /ready).
          readinessProbe:
            httpGet:
              path: /ready
              port: metrics
            {{- toYaml $w.probes.readiness | nindent 12 }}
          # Alive: /health answers while the process runs, draining included, so a drain is never cut short.
          livenessProbe:
            httpGet:
              path: /health
              port: metrics
            {{- toYaml $w.probes.liveness | nindent 12 }}
          resources:
            {{- include "tandem.worker.resources" $w | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "tandem.sharedVolumeMounts" $root | nindent 12 }}
            - name: dshm
              mountPath: /dev/shm
            {{- with $w.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        {{- include "tandem.sharedVolumes" $root | nindent 8 }}
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $w.shmSize }}
        {{- with $w.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $w.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/*
A pool's resources with its nvidia.com/gpu request and limit set to its tensorParallelSize (one engine rank per
GPU). Only where the values request GPUs at all: a pool whose resources name no nvidia.com/gpu is left as is.
*/}}
{{- define "tandem.worker.resources" -}}
{{- $resources := deepCopy .resources }}
{{- range $part := list "requests" "limits" }}
{{- $amounts := index $resources $part | default dict }}
{{- if hasKey $amounts "nvidia.com/gpu" }}
{{- $_ := set $amounts "nvidia.com/gpu" (int $.tensorParallelSize) }}
{{- end }}
{{- end }}
{{- toYaml $resources }}
{{- end }}
