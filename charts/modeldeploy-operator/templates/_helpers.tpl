{{/* Chart name, truncated to a DNS label. */}}
{{- define "modeldeploy-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart> unless the release name already contains the chart name. */}}
{{- define "modeldeploy-operator.fullname" -}}
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

{{- define "modeldeploy-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modeldeploy-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modeldeploy-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "modeldeploy-operator.labels" -}}
helm.sh/chart: {{ include "modeldeploy-operator.chart" . }}
{{ include "modeldeploy-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modeldeploy
{{- end }}

{{- define "modeldeploy-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "modeldeploy-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference: repository@digest or repository:tag (tag defaults to appVersion). */}}
{{- define "modeldeploy-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Namespaces the operator watches in namespaced scope (default: the release namespace). */}}
{{- define "modeldeploy-operator.watchNamespaces" -}}
{{- $nss := .Values.rbac.watchNamespaces | default (list .Release.Namespace) | uniq }}
{{- toJson $nss }}
{{- end }}

{{/* Namespace selection arguments for `modeldeploy-operator run`. */}}
{{- define "modeldeploy-operator.namespaceArgs" -}}
{{- if eq .Values.rbac.scope "cluster" }}
- --all-namespaces
{{- else }}
{{- range (include "modeldeploy-operator.watchNamespaces" . | fromJsonArray) }}
- --namespace={{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The operator's permissions, shared by the ClusterRole (scope cluster) and each Role (scope
namespaced). Every rule is justified in the chart README ("RBAC").
*/}}
{{- define "modeldeploy-operator.namespacedRules" -}}
# ModelDeployments: kopf lists and watches them; the reconciler reads them from that watch.
- apiGroups: ["modeldeploy.io"]
  resources: ["modeldeployments"]
  verbs: ["get", "list", "watch"]
# The operator's only write to a ModelDeployment: its status (merge patch).
- apiGroups: ["modeldeploy.io"]
  resources: ["modeldeployments/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion; clusters that enable the
# OwnerReferencesPermissionEnforcement admission plugin require this to set them.
- apiGroups: ["modeldeploy.io"]
  resources: ["modeldeployments/finalizers"]
  verbs: ["update"]
# Children the operator creates and owns: watched (label managed-by), read on a cache miss,
# written with server-side apply (PATCH; an apply that creates also needs create), and deleted
# when superseded.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Triton pods: observed only (readiness, crash loops); the Deployments create them.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# References in a spec (credentialsSecret, pvc:// claim): an existence check by name.
# No list/watch: the operator never enumerates or caches Secrets, and never reads their data.
- apiGroups: [""]
  resources: ["secrets", "persistentvolumeclaims"]
  verbs: ["get"]
# BatchInferences: watched; the operator writes only their status. Their Job carries an
# ownerReference with blockOwnerDeletion (finalizers: see above).
- apiGroups: ["modeldeploy.io"]
  resources: ["batchinferences"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["modeldeploy.io"]
  resources: ["batchinferences/status"]
  verbs: ["patch"]
- apiGroups: ["modeldeploy.io"]
  resources: ["batchinferences/finalizers"]
  verbs: ["update"]
# A BatchInference's one Indexed Job: created once (server-side apply), observed; garbage
# collection removes it with its BatchInference, so no delete.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Rollout milestones as Events (core/v1, which is also what kopf posts to).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
