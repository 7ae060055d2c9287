{{/*
Chart name (nameOverride), truncated to 63 characters: the limit of a label value.
*/}}
{{- define "accordion.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full object name: fullnameOverride, else <release>-<name>, or <release> if it contains the name.
*/}}
{{- define "accordion.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "accordion.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels the DaemonSet selects its pods by.
*/}}
{{- define "accordion.selectorLabels" -}}
app.kubernetes.io/name: {{ include "accordion.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "accordion.labels" -}}
helm.sh/chart: {{ include "accordion.chart" . }}
{{ include "accordion.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The installer's ServiceAccount.
*/}}
{{- define "accordion.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "accordion.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The installer image: repository:tag, the tag defaulting to the chart's appVersion.
*/}}
{{- define "accordion.image" -}}
{{- printf "%s:%s" .Values.image.repository (toString (default .Chart.AppVersion .Values.image.tag)) }}
{{- end }}

{{/*
Fails unless (list "key" value) holds a whole number (a YAML integer).
*/}}
{{- define "accordion.requireInt" -}}
{{- $key := index . 0 }}
{{- $v := index . 1 }}
{{- if not (or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v)) }}
{{- fail (printf "accordion: %s must be a whole number, got %v" $key $v) }}
{{- end }}
{{- if ne (float64 $v) (float64 (int64 $v)) }}
{{- fail (printf "accordion: %s must be a whole number, got %v" $key $v) }}
{{- end }}
{{- end }}

{{/*
Checks the values a node would reject or misread; renders nothing. Included by configmap.yaml, so
every render runs it. The bounds are those of docs/configuration.md.
*/}}
{{- define "accordion.validate" -}}
{{- $v := .Values.guest.vcpus }}
{{- include "accordion.requireInt" (list "guest.vcpus.default" $v.default) }}
{{- include "accordion.requireInt" (list "guest.vcpus.min" $v.min) }}
{{- include "accordion.requireInt" (list "guest.vcpus.max" $v.max) }}
{{- include "accordion.requireInt" (list "guest.memoryMiB" .Values.guest.memoryMiB) }}
{{- include "accordion.requireInt" (list "guest.maxMemoryMiB" .Values.guest.maxMemoryMiB) }}
{{- $default := int64 $v.default }}
{{- $min := int64 $v.min }}
{{- $max := int64 $v.max }}
{{- if gt $max 512 }}
{{- fail (printf "accordion: guest.vcpus.max must be at most 512, got %d" $max) }}
{{- end }}
{{- if lt $min 1 }}
{{- fail (printf "accordion: guest.vcpus.min must be at least 1, got %d" $min) }}
{{- end }}
{{- if gt $min $max }}
{{- fail (printf "accordion: guest.vcpus.min (%d) must not exceed guest.vcpus.max (%d)" $min $max) }}
{{- end }}
{{- if or (lt $default $min) (gt $default $max) }}
{{- fail (printf "accordion: guest.vcpus.default (%d) must be between guest.vcpus.min (%d) and guest.vcpus.max (%d)" $default $min $max) }}
{{- end }}
{{- if lt (int64 .Values.guest.memoryMiB) 128 }}
{{- fail (printf "accordion: guest.memoryMiB must be at least 128, got %d" (int64 .Values.guest.memoryMiB)) }}
{{- end }}
{{- $maxMemory := int64 .Values.guest.maxMemoryMiB }}
{{- if or (lt $maxMemory 0) (gt $maxMemory 1048576) }}
{{- fail (printf "accordion: guest.maxMemoryMiB must be 0 to 1048576, got %d" $maxMemory) }}
{{- end }}
{{- $policies := list "limits-then-requests" "limits" "requests" }}
{{- if not (has (toString .Values.guest.sizingPolicy) $policies) }}
{{- fail (printf "accordion: guest.sizingPolicy must be one of %s, got %q" (join ", " $policies) (toString .Values.guest.sizingPolicy)) }}
{{- end }}
{{- if not (kindIs "string" .Values.guest.kernelParams) }}
{{- fail (printf "accordion: guest.kernelParams must be a string, got %v" .Values.guest.kernelParams) }}
{{- end }}
{{- $levels := list "error" "warn" "info" "debug" "trace" }}
{{- if not (has (toString .Values.logLevel) $levels) }}
{{- fail (printf "accordion: logLevel must be one of %s, got %q" (join ", " $levels) (toString .Values.logLevel)) }}
{{- end }}
{{- $versions := list "auto" "1" "2" }}
{{- if not (has (toString .Values.containerd.version) $versions) }}
{{- fail (printf "accordion: containerd.version must be one of %s, got %q" (join ", " $versions) (toString .Values.containerd.version)) }}
{{- end }}
{{- $restarts := list "systemd" "none" }}
{{- if not (has (toString .Values.containerd.restart) $restarts) }}
{{- fail (printf "accordion: containerd.restart must be one of %s, got %q" (join ", " $restarts) (toString .Values.containerd.restart)) }}
{{- end }}
{{- if not (hasPrefix "/" (toString .Values.containerd.configPath)) }}
{{- fail (printf "accordion: containerd.configPath must be an absolute path, got %q" (toString .Values.containerd.configPath)) }}
{{- end }}
{{- if not .Values.nodeLabel }}
{{- fail "accordion: nodeLabel must not be empty" }}
{{- end }}
{{- if not .Values.runtimeClass.handler }}
{{- fail "accordion: runtimeClass.handler must not be empty" }}
{{- end }}
{{- include "accordion.requireInt" (list "metrics.port" .Values.metrics.port) }}
{{- $port := int64 .Values.metrics.port }}
{{- if or (lt $port 1) (gt $port 65535) }}
{{- fail (printf "accordion: metrics.port must be 1 to 65535, got %d" $port) }}
{{- end }}
{{- end }}

{{/*
/etc/accordion/config.toml in the format of docs/configuration.md. Strings are written with toJson:
a JSON string is a valid TOML basic string.
*/}}
{{- define "accordion.configToml" -}}
# /etc/accordion/config.toml, rendered by the accordion Helm chart (docs/configuration.md).
log_level = {{ toString .Values.logLevel | toJson }}
{{- with .Values.guest.kernelParams }}

[guest]
kernel_params = {{ toJson . }}
{{- end }}

[vcpus]
default = {{ int64 .Values.guest.vcpus.default }}
min = {{ int64 .Values.guest.vcpus.min }}
max = {{ int64 .Values.guest.vcpus.max }}
sizing_policy = {{ toString .Values.guest.sizingPolicy | toJson }}

[memory]
default_mib = {{ int64 .Values.guest.memoryMiB }}
max_mib = {{ int64 .Values.guest.maxMemoryMiB }}
{{- end }}
