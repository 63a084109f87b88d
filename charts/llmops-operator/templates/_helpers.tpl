{{/* Short name of the chart. */}}
{{- define "llmops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: "<release>-operator" unless the release name already says "operator". */}}
{{- define "llmops.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "operator" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llmops.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llmops.labels" -}}
{{ include "llmops.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: llmops
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "llmops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llmops.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "llmops.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The operator's rights in a namespace it watches; the same rules go into the ClusterRole (all namespaces) or into
one Role per watched namespace. Each rule is what the code does (docs/install.md explains every one):
  - kopf lists and watches our kinds; the operator server-side-applies their status (PATCH on /status);
    `update` on finalizers only lets it set blockOwnerDeletion on its children's owner references where the
    OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift);
  - children are written with server-side apply: PATCH, plus CREATE the first time (the API server checks both);
    the namespace's shared payload ConfigMap is applied once (immutable); whether a name is still held by an
    earlier same-named resource's run is read from the watches, not with GETs;
  - the operator grants each job's Ray pods get/patch on one ConfigMap, and RBAC lets it grant only rights it
    holds: hence `get` on configmaps;
  - RayServices are deleted while an LLMService is suspended; RayJobs are never deleted (suspend is a field);
  - a job's RayCluster (KubeRay's) is listed by name only while its pods are late, to show why KubeRay cannot
    create them (its ReplicaFailure condition: a Pod Security level or a quota refusing them);
  - Kueue Workloads are listed (by their job-uid label) only for a job waiting in a queue (spec.queueName), to
    show Kueue's reason; a cluster without Kueue answers 404 and nothing else needs them;
  - an LLMService's spec.expose: its HTTPRoute (Gateway API) and, with apiKey, Envoy Gateway's SecurityPolicy,
    written like the other children and deleted when the spec stops asking for them (whether those APIs exist is
    read from the discovery documents every account may read). Neither object carries a secret value;
  - core/v1 Events: one per phase change. No Secrets, no cluster-scoped reads.
*/}}
{{- define "llmops.rules" -}}
- apiGroups: [llmops.dev]
  resources: [finetunes, batchinferences, llmservices]
  verbs: [list, watch]
- apiGroups: [llmops.dev]
  resources: [finetunes/status, batchinferences/status, llmservices/status]
  verbs: [patch]
- apiGroups: [llmops.dev]
  resources: [finetunes/finalizers, batchinferences/finalizers, llmservices/finalizers]
  verbs: [update]
- apiGroups: [ray.io]
  resources: [rayjobs]
  verbs: [list, watch, create, patch]
- apiGroups: [ray.io]
  resources: [rayservices]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [ray.io]
  resources: [rayclusters]
  verbs: [list]
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [create, patch]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [create, patch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [gateway.networking.k8s.io]
  resources: [httproutes]
  verbs: [create, patch, delete]
- apiGroups: [gateway.envoyproxy.io]
  resources: [securitypolicies]
  verbs: [create, patch, delete]
{{- end -}}

{{/*
Leader election (`llmops run --leader-election NAME`): the operator reads and renews the one Lease of that name in
its own namespace, and creates it the first time (RBAC cannot restrict `create` by name). A waiting replica lists
and watches that Lease by name (a field selector on metadata.name, which RBAC checks against resourceNames).
*/}}
{{- define "llmops.leaderElectionRules" -}}
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [create]
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  resourceNames: [{{ .Values.leaderElection.name }}]
  verbs: [get, list, watch, update]
{{- end -}}
