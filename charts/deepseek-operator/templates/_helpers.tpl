{{/* Names and labels shared by every template. */}}
{{- define "deepseek-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "deepseek-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "deepseek-operator.labels" -}}
app.kubernetes.io/name: {{ include "deepseek-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "deepseek-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deepseek-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "deepseek-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "deepseek-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The rules the operator needs in a namespace it manages (used by the ClusterRole and by per-namespace Roles).
Every verb here is one the operator's code calls (operator/deepseek_operator/kube.py and kopf); nothing more. */}}
{{- define "deepseek-operator.namespacedRules" -}}
# kopf lists and watches both kinds and patches their metadata (annotations, the ApiKey finalizer).
- apiGroups: [deepseek.ai]
  resources: [deepseekdeployments, apikeys]
  verbs: [get, list, watch, patch]
- apiGroups: [deepseek.ai]
  resources: [deepseekdeployments/status]
  verbs: [patch]
- apiGroups: [deepseek.ai]
  resources: [apikeys/status]
  verbs: [update]
# Children carry owner references with blockOwnerDeletion (admission may require this to set them).
- apiGroups: [deepseek.ai]
  resources: [deepseekdeployments/finalizers, apikeys/finalizers]
  verbs: [update]
# ApiKey Secrets: read, written and deleted by name, never patched; listed and watched by label, metadata only
# (PartialObjectMetadata: no Secret data is requested), so that a changed Secret wakes its key instead of every
# Secret being read on a timer. (Signing keys are in the operator's own namespace; an old-layout
# `<deployment>-signing-key` here is read once, moved, deleted.)
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, update, delete]
# The auth ConfigMap: written whole under a resourceVersion guard. `watch` is not used by the operator itself: the
# server's Role grants get/watch on its own auth ConfigMap, and Kubernetes only lets the operator grant what it holds.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, watch, create, update]
# Services and the server's RBAC objects: created, then server-side applied; owner references remove them.
- apiGroups: [""]
  resources: [services, serviceaccounts]
  verbs: [get, create, patch]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create, patch]
# The blue/green Deployments: listed by label, created, replaced whole (a new revision), scaled.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, create, update]
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list]
# Events: the operator's own are created; the kubelet's FailedMount Events are listed while new pods start.
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
{{- end -}}

{{/*
A duration value (`15s`, `1m30s`, `500ms`; values.schema.json holds the form) in milliseconds, as a float.
*/}}
{{- define "deepseek-operator.milliseconds" -}}
{{- $total := 0.0 -}}
{{- $scale := dict "ms" 1.0 "s" 1000.0 "m" 60000.0 "h" 3600000.0 -}}
{{- range $part := regexFindAll "[0-9]+(\\.[0-9]+)?(ms|s|m|h)" (toString .) -1 -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $part -}}
{{- $total = addf $total (mulf (float64 $number) (get $scale (trimPrefix $number $part))) -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{/*
A resource quantity (`100m`, `256Mi`, `1.5`, `1e3`; values.schema.json holds the form) as a float: cores for cpu, bytes
for memory.
*/}}
{{- define "deepseek-operator.quantity" -}}
{{- $text := trimPrefix "+" (toString .) -}}
{{- $scale := dict "n" 1e-9 "u" 1e-6 "m" 1e-3 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 -}}
{{- $number := regexFind "^([0-9]+(\\.[0-9]*)?|\\.[0-9]+)" $text -}}
{{- $suffix := trimPrefix $number $text -}}
{{- if hasKey $scale $suffix -}}
{{- mulf (float64 $number) (get $scale $suffix) -}}
{{- else -}}
{{- float64 $text -}}
{{- end -}}
{{- end -}}

{{/*
Fails the render when a resource request is above its limit (the API server would refuse the Deployment half-way
through the install, after the objects before it were created).
*/}}
{{- define "deepseek-operator.checkResources" -}}
{{- $limits := .limits | default dict -}}
{{- range $name, $request := (.requests | default dict) -}}
{{- if hasKey $limits $name -}}
{{- $limit := get $limits $name -}}
{{- if gt (include "deepseek-operator.quantity" $request | float64) (mulf (include "deepseek-operator.quantity" $limit | float64) 1.000000001) -}}
{{- fail (printf "resources.requests.%s (%v) is more than resources.limits.%s (%v): a request may not exceed its limit; raise the limit too" $name $request $name $limit) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The pre-delete hook that empties the CRDs before `helm uninstall` deletes them
(templates/uninstall-cleanup.yaml). */}}
{{- define "deepseek-operator.uninstallCleanupName" -}}
{{- printf "%s-uninstall-cleanup" (include "deepseek-operator.fullname" . | trunc 45 | trimSuffix "-") -}}
{{- end -}}

{{- define "deepseek-operator.uninstallCleanupLabels" -}}
{{ include "deepseek-operator.labels" . }}
app.kubernetes.io/component: uninstall-cleanup
{{- end -}}

{{/* Its pod's labels: not the operator's selector labels, so that neither the Deployment, the PodDisruptionBudget nor
the NetworkPolicy's "operator's pods" select it. */}}
{{- define "deepseek-operator.uninstallCleanupPodLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: uninstall-cleanup
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* A hook object's annotations, given its weight: created in weight order before `helm uninstall` deletes anything,
replaced by the next try, deleted once every hook has succeeded (a failed Job stays, for its log). */}}
{{- define "deepseek-operator.uninstallCleanupHook" -}}
helm.sh/hook: pre-delete
helm.sh/hook-weight: {{ . | quote }}
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end -}}

{{/* What the hook does: list every ApiKey and DeepSeekDeployment (metadata only) and delete them, one request per
namespace. Finalizers, status, Secrets and revocation stay the operator's. */}}
{{- define "deepseek-operator.uninstallCleanupRules" -}}
- apiGroups: [deepseek.ai]
  resources: [apikeys, deepseekdeployments]
  verbs: [list, deletecollection]
{{- end -}}
