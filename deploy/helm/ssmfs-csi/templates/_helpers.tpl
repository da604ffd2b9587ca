{{- define "ssmfs-csi.labels" -}}
app.kubernetes.io/name: ssmfs-csi
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ssmfs-csi.selector" -}}
app.kubernetes.io/name: ssmfs-csi
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ssmfs-csi.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "ssmfs-csi.defaults" -}}
{{- $defaults := deepCopy .Values.defaultAttributes -}}
{{- if .Values.eventsTopic -}}
{{- $_ := set $defaults "eventsTopic" .Values.eventsTopic -}}
{{- end -}}
{{- $defaults | toJson -}}
{{- end -}}


{{/* AWS endpoints and extra variables, for both containers. */}}
{{- define "ssmfs-csi.awsEnv" -}}
{{- range $service, $url := .Values.awsEndpoints }}
{{- if $url }}
- name: AWS_ENDPOINT_URL_{{ $service | upper | replace "-" "_" }}
  value: {{ $url | quote }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}
