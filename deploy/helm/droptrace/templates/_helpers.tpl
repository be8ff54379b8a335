{{- define "droptrace.selectorLabels" -}}
app.kubernetes.io/name: droptrace
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "droptrace.labels" -}}
{{ include "droptrace.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* capabilities.txt without comments and blank lines, unless values.capabilities is set. */}}
{{- define "droptrace.capabilities" -}}
{{- if .Values.capabilities }}
{{- toYaml .Values.capabilities }}
{{- else }}
{{- range splitList "\n" (.Files.Get "capabilities.txt") }}
{{- $cap := trim (regexReplaceAll "#.*" . "") }}
{{- if $cap }}
- {{ $cap }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
