{{/*
What the operator does in a namespace it serves: every verb listed is used by the handlers or
by Kopf itself (finalizers and progress annotations are patches; Events report to users).
No wildcards, and no access to Secrets: loader Jobs reference Secrets by name only.
*/}}
{{- define "llmops.operator.namespacedRules" -}}
- apiGroups: ["llmops.dev"]
  resources: ["llmdeployments"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["llmops.dev"]
  resources: ["llmdeployments/status", "llmdeployments/scale"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["ray.io"]
  resources: ["rayservices"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["podmonitors"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims", "services"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
Cluster-scoped reads Kopf uses to discover CRDs and namespaces.
*/}}
{{- define "llmops.operator.discoveryRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
{{- end }}
