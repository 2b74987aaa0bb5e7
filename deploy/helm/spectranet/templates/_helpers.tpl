{{/* Chart name, truncated to the 63 characters Kubernetes allows in names. */}}
{{- define "spectranet.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name: "<release>" if it already contains the chart name, else "<release>-<chart>". */}}
{{- define "spectranet.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "spectranet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spectranet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "spectranet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "spectranet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "spectranet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spectranet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image: the CUDA variant ("-cuda" tag) when gpu.enabled and no explicit tag is given. */}}
{{- define "spectranet.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-cuda" "" .Values.gpu.enabled)) -}}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* KEDA's ceiling: never more replicas than partitions (extra consumers would get no partition). */}}
{{- define "spectranet.maxReplicas" -}}
{{- min (int .Values.keda.maxReplicaCount) (int .Values.kafka.partitions) }}
{{- end }}

{{/* Environment shared by the daemon and the migration Job: config file, database URL file, Kafka SASL. */}}
{{- define "spectranet.env" -}}
- name: SPECTRANET_CONFIG
  value: /etc/spectranet/config.yaml
- name: SPECTRANET_DATABASE__URL_FILE
  value: /var/run/secrets/spectranet/database/{{ .Values.database.urlKey }}
{{- if .Values.model.path }}
- name: SPECTRANET_MODEL__PATH
  value: {{ .Values.model.path | quote }}
{{- end }}
{{- with .Values.kafka.sasl.existingSecret }}
- name: KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.kafka.sasl.usernameKey }}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.kafka.sasl.passwordKey }}
{{- end }}
{{- end }}

{{- define "spectranet.volumeMounts" -}}
- name: config
  mountPath: /etc/spectranet
  readOnly: true
- name: database-url
  mountPath: /var/run/secrets/spectranet/database
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.model.persistentVolumeClaim }}
- name: models
  mountPath: /models
  readOnly: true
{{- end }}
{{- end }}

{{- define "spectranet.volumes" -}}
- name: config
  configMap:
    name: {{ include "spectranet.fullname" . }}
- name: database-url
  secret:
    secretName: {{ required "database.existingSecret: the name of a Secret holding the database URL" .Values.database.existingSecret }}
    items:
      - key: {{ .Values.database.urlKey }}
        path: {{ .Values.database.urlKey }}
- name: tmp
  emptyDir: {}
{{- if .Values.model.persistentVolumeClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.model.persistentVolumeClaim }}
    readOnly: true
{{- end }}
{{- end }}
