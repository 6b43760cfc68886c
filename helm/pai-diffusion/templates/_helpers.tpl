{{/* Names: the release name, with the chart name added unless it already contains it. */}}
{{- define "pai-diffusion.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Recommended labels; call with (dict "root" $ "component" "finetune"). */}}
{{- define "pai-diffusion.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: pai-diffusion-jobs
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{/* The image: by digest when one is given (what ran can then be named exactly), else by tag. */}}
{{- define "pai-diffusion.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* A quantity ("8", "64Gi", "500m") times a factor: a GPU job's resources are given per GPU. */}}
{{- define "pai-diffusion.times" -}}
{{- $quantity := toString .quantity -}}
{{- $unit := regexFind "[A-Za-z]+$" $quantity -}}
{{- printf "%v%s" (mulf (trimSuffix $unit $quantity) .factor) $unit -}}
{{- end -}}

{{/* The claim a volume of .Values.storage uses: yours, or the one this chart creates. */}}
{{- define "pai-diffusion.claim" -}}
{{- $storage := index .root.Values.storage .name -}}
{{- $storage.existingClaim | default (printf "%s-%s" (include "pai-diffusion.fullname" .root) .name) -}}
{{- end -}}

{{/* A Job's labels: the recommended ones, and the Kueue queue that admits it, if any. */}}
{{- define "pai-diffusion.jobLabels" -}}
{{ include "pai-diffusion.labels" . }}
{{- with .root.Values.kueue.queueName }}
kueue.x-k8s.io/queue-name: {{ . }}
{{- end -}}
{{- end -}}

{{/*
The Job spec every workload shares. Call with (dict "root" $ "component" "finetune" "job" .Values.finetune
"gpu" true "mounts" (list "data" "cache" "outputs") "args" (list "finetune")) and optionally "perIndex"
(an Indexed Job whose indexes fail alone), "env" (a list of variables after the model's, before the
job's `env` map), "command", "ports", "subdomain", "withoutModel" (no MODEL_NAME, hub not offline) and
"objectStorage" (the object-storage Secret's variables, for the jobs that read datasets). A job's
`priorityClassName` and `affinity` replace the chart-wide ones; its `env`, `envFrom` and `podAnnotations`
add to them.
*/}}
{{- define "pai-diffusion.jobSpec" -}}
{{- $root := .root -}}
{{- $job := .job -}}
{{- $fullname := include "pai-diffusion.fullname" $root -}}
{{- if $root.Values.kueue.queueName }}
suspend: true  # Kueue starts the Job when its queue admits it
{{- end }}
{{- if .perIndex }}
backoffLimitPerIndex: {{ $job.backoffLimitPerIndex }}  # a failing shard is retried alone
{{- else if gt (int ($job.nodes | default 1)) 1 }}
# Counted over all pods: one node's failure fails its N - 1 peers too, so 3 retries of the group are 3 x N.
backoffLimit: {{ mul 3 $job.nodes }}
{{- else }}
backoffLimit: 3
{{- end }}
activeDeadlineSeconds: {{ $job.activeDeadlineSeconds }}
ttlSecondsAfterFinished: 604800  # keep the finished Job and its logs a week
podFailurePolicy:
  rules:
    - action: {{ ternary "FailIndex" "FailJob" (.perIndex | default false) }}  # exit 2: bad configuration or input, a retry cannot help
      onExitCodes:
        containerName: {{ .component }}
        operator: In
        values: [2]
    - action: Ignore  # preemption, eviction, drain: not the job's fault, no retry used up
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
template:
  metadata:
    labels:
      {{- include "pai-diffusion.labels" (dict "root" $root "component" .component) | nindent 6 }}
    {{- with merge (dict) ($job.podAnnotations | default dict) $root.Values.podAnnotations }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  spec:
    restartPolicy: Never
    serviceAccountName: {{ $fullname }}
    automountServiceAccountToken: false  # the jobs never call the Kubernetes API
    terminationGracePeriodSeconds: {{ $job.terminationGracePeriodSeconds | default 30 }}
    {{- with $job.priorityClassName | default $root.Values.priorityClassName }}
    priorityClassName: {{ . }}
    {{- end }}
    {{- with $root.Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .subdomain }}
    subdomain: {{ . }}  # the headless Service that gives node 0 its name
    {{- end }}
    securityContext:
      runAsNonRoot: true
      runAsUser: 1000
      runAsGroup: 1000
      fsGroup: 1000
      fsGroupChangePolicy: OnRootMismatch  # not a chown of every file of a big claim at each start
      seccompProfile:
        type: RuntimeDefault
    {{- if .gpu }}
    {{- with $root.Values.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $root.Values.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- end }}
    {{- with $job.affinity | default $root.Values.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      - name: {{ .component }}
        image: {{ include "pai-diffusion.image" $root }}
        imagePullPolicy: {{ $root.Values.image.pullPolicy }}
        {{- with .command }}
        command: {{ toJson . }}
        {{- end }}
        args: {{ toJson .args }}
        env:
          - name: HF_HOME
            value: /cache/huggingface
          {{- if not .withoutModel }}
          {{- if ne .component "prefetch" }}
          - name: HF_HUB_OFFLINE  # load the model from the cache that prefetch filled
            value: "1"
          {{- end }}
          - name: MODEL_NAME
            value: {{ $root.Values.model }}
          {{- end }}
          {{- with .env }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
          {{- range $name, $value := merge (dict) ($job.env | default dict) $root.Values.env }}
          - name: {{ $name }}
            value: {{ $value | toString | quote }}
          {{- end }}
        {{- $envFrom := concat $root.Values.envFrom ($job.envFrom | default list) }}
        {{- if or .objectStorage $envFrom }}
        envFrom:
          {{- if .objectStorage }}
          - secretRef:  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for s3:// paths
              name: {{ $root.Values.objectStorage.secretName | default (printf "%s-object-storage" $fullname) }}
              optional: true
          {{- end }}
          {{- with $envFrom }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        {{- end }}
        {{- with .ports }}
        ports:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- $gpus := ternary (int $job.gpus) 1 (.gpu | default false) }}
        resources:  # a GPU job's CPU and memory are per GPU
          requests:
            {{- range $name, $quantity := $job.resources.requests }}
            {{ $name }}: {{ ternary $quantity (include "pai-diffusion.times" (dict "quantity" $quantity "factor" $gpus)) (eq $name "ephemeral-storage") | quote }}
            {{- end }}
          limits:
            {{- range $name, $quantity := $job.resources.limits }}
            {{ $name }}: {{ ternary $quantity (include "pai-diffusion.times" (dict "quantity" $quantity "factor" $gpus)) (eq $name "ephemeral-storage") | quote }}
            {{- end }}
            {{- if .gpu }}
            nvidia.com/gpu: {{ $job.gpus }}
            {{- end }}
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities:
            drop: [ALL]
        volumeMounts:
          {{- range .mounts }}
          - name: {{ . }}
            mountPath: {{ get (dict "data" "/data" "cache" "/cache" "outputs" "/outputs" "prompts" "/etc/pai-diffusion") . }}
            {{- if has . (list "data" "prompts") }}
            readOnly: true
            {{- end }}
          {{- end }}
          - name: tmp
            mountPath: /tmp
          - name: dshm
            mountPath: /dev/shm
    volumes:
      {{- range .mounts }}
      - name: {{ . }}
        {{- if eq . "prompts" }}
        configMap:
          name: {{ $fullname }}-prompts
        {{- else }}
        persistentVolumeClaim:
          claimName: {{ include "pai-diffusion.claim" (dict "root" $root "name" (get (dict "data" "datasets" "cache" "models" "outputs" "outputs") .)) }}
          {{- if eq . "data" }}
          readOnly: true
          {{- end }}
        {{- end }}
      {{- end }}
      - name: tmp  # compile caches (inductor, Triton) and temporaries
        emptyDir:
          sizeLimit: {{ $job.tmpSize }}
      - name: dshm  # data loader workers and NCCL share memory through /dev/shm (64 Mi by default)
        emptyDir:
          medium: Memory
          sizeLimit: {{ $job.shmSize }}
{{- end -}}
