{{/*
What the operator does in a namespace it serves: every verb listed is used by the handlers or
by Kopf itself (finalizers and progress annotations are patches; Events report to users).
Children are written with server-side apply: a PATCH, which the API server also authorizes as
"create" when the object does not exist yet.
No wildcards. Secrets: get only, for the resourceVersion of spec.cache.credentialsSecret (it
names the loader Job, so a fixed token replaces a failed download); loader Jobs and init
containers reference the Secret by name, the operator never copies its data.
*/}}
{{- define "llmops.operator.namespacedRules" -}}
# get: a model's scale change runs a pass of its LLMDeployment, read then.
- apiGroups: ["llmops.dev"]
  resources: ["llmdeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["llmops.dev"]
  resources: ["llmdeployments/status"]
  verbs: ["patch"]
# Children carry blockOwnerDeletion: true; OwnerReferencesPermissionEnforcement (OpenShift)
# admits that only from a creator that may update the owner's finalizers.
- apiGroups: ["llmops.dev"]
  resources: ["llmdeployments/finalizers"]
  verbs: ["update"]
# One LLMModel per model (its scale target): created once with its first replica count, then
# applied without it (KEDA's HPA and `kubectl scale` own it); watched for scale changes;
# pruned with its model. Its status carries the ready replicas and the worker selector.
- apiGroups: ["llmops.dev"]
  resources: ["llmmodels"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["llmops.dev"]
  resources: ["llmmodels/status"]
  verbs: ["patch"]
- apiGroups: ["ray.io"]
  resources: ["rayservices"]
  verbs: ["list", "watch", "create", "patch"]
# Worker groups' min/max replicas of the active cluster (KubeRay's hash leaves them out);
# rollout Recreate deletes an active cluster of an older spec.
- apiGroups: ["ray.io"]
  resources: ["rayclusters"]
  verbs: ["get", "patch", "delete"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["podmonitors"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "patch"]
# One NetworkPolicy per LLMDeployment: only the gateway reaches its graph.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "patch"]
# The credentials Secret's resourceVersion names the loader Job.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# status.replicas counts the active cluster's ready worker pods.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
Cluster-scoped reads Kopf uses to discover CRDs and namespaces.
*/}}
{{- define "llmops.operator.discoveryRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}

{{/*
What the gateway reads for config.discoverBackends: LLMDeployments, their status included
(list once, then watch). Nothing else.
*/}}
{{- define "llmops.gateway.rules" -}}
- apiGroups: ["llmops.dev"]
  resources: ["llmdeployments"]
  verbs: ["list", "watch"]
{{- end }}

{{/*
What a namespace's admins and editors get for models (templates/clusterrole-model-scaler.yaml):
read the LLMModels and write their scale subresource, as `kubectl scale llmmodel` does (GET
then PATCH or PUT of llmmodels/scale). The operator owns everything else of an LLMModel.
*/}}
{{- define "llmops.modelScaler.rules" -}}
- apiGroups: ["llmops.dev"]
  resources: ["llmmodels"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["llmops.dev"]
  resources: ["llmmodels/scale"]
  verbs: ["get", "update", "patch"]
{{- end }}
