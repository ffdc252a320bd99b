{{/* Names and labels shared by the templates. */}}

{{- define "morphml.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "morphml.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "morphml.operatorName" -}}
{{- printf "%s-operator" (include "morphml.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "morphml.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "morphml.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "morphml.selectorLabels" -}}
app.kubernetes.io/name: {{ include "morphml.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "morphml.labels" -}}
{{ include "morphml.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "morphml.masterImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "morphml.workerImage" -}}
{{- printf "%s:%s" .Values.workerImage.repository (default .Chart.AppVersion .Values.workerImage.tag) -}}
{{- end -}}

{{/*
The operator's permissions, exactly what morphml_operator.handlers uses (kopf included):
- nasexperiments: watch them, patch annotations (kopf's progress), status (the timer);
  nasexperiments/finalizers update lets owner references block owner deletion.
- what an experiment owns: create and read it; patch the ConfigMap and Deployment when the spec
  changes; delete the master pod (restart on a budget change, cleanup on finish); watch worker pods.
- events: post milestones.
Secrets: get and create only (the token of each experiment; never list or watch).
*/}}
{{- define "morphml.rules" -}}
- apiGroups: [morphml.io]
  resources: [nasexperiments]
  verbs: [get, list, watch, patch]
- apiGroups: [morphml.io]
  resources: [nasexperiments/status]
  verbs: [get, patch]
- apiGroups: [morphml.io]
  resources: [nasexperiments/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [services, persistentvolumeclaims, serviceaccounts, secrets]
  verbs: [get, create]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, create, patch, update]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create]
{{- end -}}
