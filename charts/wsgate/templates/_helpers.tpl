{{/* Names, labels and checks shared by the templates. */}}

{{- define "wsgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* RELEASE-CHART, or RELEASE when it already contains the chart name. */}}
{{- define "wsgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "wsgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "wsgate.labels" -}}
helm.sh/chart: {{ include "wsgate.chart" . }}
app.kubernetes.io/name: {{ include "wsgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wsgate
{{- end -}}

{{- define "wsgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wsgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wsgate.controller.name" -}}
{{- printf "%s-controller" (include "wsgate.fullname" .) -}}
{{- end -}}

{{- define "wsgate.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create -}}
{{- default (include "wsgate.controller.name" .) .Values.controller.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.controller.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "wsgate.gateway.name" -}}
{{- printf "%s-gateway" (include "wsgate.fullname" .) -}}
{{- end -}}

{{- define "wsgate.webhook.configurationName" -}}
{{- default (printf "%s-injector" (include "wsgate.fullname" .)) .Values.webhook.configurationName -}}
{{- end -}}

{{- define "wsgate.webhook.secretName" -}}
{{- default (printf "%s-webhook-cert" (include "wsgate.fullname" .)) .Values.webhook.certificate.secretName -}}
{{- end -}}

{{- define "wsgate.webhook.certificateName" -}}
{{- printf "%s-webhook" (include "wsgate.fullname" .) -}}
{{- end -}}

{{- define "wsgate.leaseName" -}}
{{- include "wsgate.controller.name" . -}}
{{- end -}}

{{- define "wsgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "wsgate.injection.image" -}}
{{- $repo := default .Values.image.repository .Values.injection.image.repository -}}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.injection.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{/* The control API as gateways reach it. */}}
{{- define "wsgate.controlUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "wsgate.controller.name" .) .Release.Namespace .Values.controlApi.port -}}
{{- end -}}

{{/* Namespaces never injected: the configured ones and the release's own. */}}
{{- define "wsgate.excludedNamespaces" -}}
{{- $list := .Values.webhook.excludedNamespaces | default list -}}
{{- uniq (append $list .Release.Namespace) | toJson -}}
{{- end -}}

{{/* The restricted container securityContext every wsgate container runs with. */}}
{{- define "wsgate.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "wsgate.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Environment shared by wsgate processes. */}}
{{- define "wsgate.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      apiVersion: v1
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      apiVersion: v1
      fieldPath: metadata.namespace
- name: WSGATE_LOG
  value: {{ .Values.log.level | quote }}
- name: WSGATE_LOG_FORMAT
  value: {{ .Values.log.format | quote }}
{{- with .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)"
{{- end }}
{{- end -}}

{{/* PodDisruptionBudget API for the target cluster (policy/v1 from 1.21). */}}
{{- define "wsgate.pdbApiVersion" -}}
{{- if semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version -}}policy/v1{{- else -}}policy/v1beta1{{- end -}}
{{- end -}}

{{/* Checks that values cannot express in values.schema.json. */}}
{{- define "wsgate.validate" -}}
{{- if eq (int .Values.injection.port) (int .Values.injection.adminPort) -}}
{{- fail "injection.port and injection.adminPort must differ" -}}
{{- end -}}
{{- if eq (int .Values.ingressGateway.port) (int .Values.ingressGateway.adminPort) -}}
{{- fail "ingressGateway.port and ingressGateway.adminPort must differ" -}}
{{- end -}}
{{- if eq (int .Values.controlApi.port) (int .Values.webhook.port) -}}
{{- fail "controlApi.port and webhook.port must differ" -}}
{{- end -}}
{{- end -}}
