{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "llmops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every object name: the release name, plus the chart name unless the release name
already contains it. Component names append "-<component>", so 50 characters are left for it.
*/}}
{{- define "llmops.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of a component's objects. Call with (dict "ctx" $ "component" "gateway").
*/}}
{{- define "llmops.componentName" -}}
{{- printf "%s-%s" (include "llmops.fullname" .ctx) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "llmops.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select a component's pods. Call with (dict "ctx" $ "component" "gateway").
*/}}
{{- define "llmops.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmops.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Labels of every object. Call with (dict "ctx" $ "component" "gateway"); an empty component
leaves the component label out.
*/}}
{{- define "llmops.labels" -}}
helm.sh/chart: {{ include "llmops.chart" .ctx }}
app.kubernetes.io/name: {{ include "llmops.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
app.kubernetes.io/part-of: llmops
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels every pod of this release carries, whatever its component: what the default-deny
NetworkPolicy selects.
*/}}
{{- define "llmops.releaseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "llmops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
An image reference: repository@digest when a digest is set (it wins over the tag: the kubelet
pulls exactly that content), else repository:tag. The platform's own images default the tag
to the chart's appVersion; third-party images (redis) pass "path" and must set a tag or a
digest. Call with (dict "ctx" $ "image" .Values.gateway.image).
*/}}
{{- define "llmops.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else if .path }}
{{- printf "%s:%s" .image.repository (required (printf "%s.tag or %s.digest is required" .path .path) .image.tag) }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
ServiceAccount names.
*/}}
{{- define "llmops.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "llmops.componentName" (dict "ctx" . "component" "operator")) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llmops.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "llmops.componentName" (dict "ctx" . "component" "gateway")) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- required "gateway.serviceAccount.name is required when gateway.serviceAccount.create is false" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The value of a settings field as an environment variable: strings as they are, everything else
(numbers, booleans, lists, maps) as JSON, which is what pydantic-settings parses.
*/}}
{{- define "llmops.envValue" -}}
{{- if kindIs "string" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/*
Environment variables for a settings mapping, one per key: <prefix><KEY_IN_SNAKE_CASE>.
Keys whose value is null are left out (the process default applies); keys in "skip" are
rendered by the caller. Call with (dict "prefix" "LLMOPS_GATEWAY_" "config" .Values.gateway.config
"skip" (list "redisUrl")).
*/}}
{{- define "llmops.settingsEnv" -}}
{{- $skip := default (list) .skip }}
{{- range $key, $value := .config }}
{{- if and (not (has $key $skip)) (not (kindIs "invalid" $value)) }}
- name: {{ printf "%s%s" $.prefix (snakecase $key | upper) }}
  value: {{ include "llmops.envValue" $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Pod-level security context of the restricted Pod Security Standard, for a numeric user.
*/}}
{{- define "llmops.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Container-level security context of the restricted Pod Security Standard.
*/}}
{{- define "llmops.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Namespaces the operator watches; empty means cluster-wide.
*/}}
{{- define "llmops.operator.namespaced" -}}
{{- if .Values.operator.config.namespaces }}true{{ end }}
{{- end }}

{{/*
Host and port of the in-chart Redis.
*/}}
{{- define "llmops.redis.host" -}}
{{- printf "%s.%s.svc" (include "llmops.componentName" (dict "ctx" . "component" "redis")) .Release.Namespace }}
{{- end }}

{{/*
Secret and key holding the in-chart Redis password.
*/}}
{{- define "llmops.redis.secretName" -}}
{{- default (include "llmops.componentName" (dict "ctx" . "component" "redis")) .Values.redis.auth.existingSecret }}
{{- end }}

{{/*
Grace period of gateway pods: longer than the preStop sleep plus the drain deadline.
*/}}
{{- define "llmops.gateway.terminationGracePeriodSeconds" -}}
{{- $needed := add (int .Values.gateway.preStopSleepSeconds) (int (ceil .Values.gateway.config.drainTimeoutS)) }}
{{- $set := .Values.gateway.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $set }}
{{- add $needed 15 }}
{{- else if le (int $set) (int $needed) }}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%d) must exceed gateway.preStopSleepSeconds + gateway.config.drainTimeoutS (%d), or streams are cut before they drain" (int $set) (int $needed)) }}
{{- else }}
{{- int $set }}
{{- end }}
{{- end }}

{{/*
Key inside the Redis password Secret.
*/}}
{{- define "llmops.redis.secretKey" -}}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretKey }}{{ else }}redis-password{{ end }}
{{- end }}

{{/*
NetworkPolicy egress rule allowing DNS lookups (any namespace: the cluster DNS differs between
distributions).
*/}}
{{- define "llmops.networkPolicy.dnsEgress" -}}
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end }}

{{/*
Egress to the Kubernetes API server (networkPolicy.apiServer: its CIDRs and ports).
*/}}
{{- define "llmops.networkPolicy.apiServerEgress" -}}
- ports:
    {{- range .Values.networkPolicy.apiServer.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  to:
    {{- range .Values.networkPolicy.apiServer.cidrs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
{{- end }}

{{/*
Secret holding the certificate of the gateway's public hosts (gateway.tls).
*/}}
{{- define "llmops.gateway.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "llmops.componentName" (dict "ctx" . "component" "gateway"))) .Values.gateway.tls.secretName }}
{{- end }}

{{/*
Refuses contradictory exposure values (gateway.ingress, gateway.httpRoute, gateway.tls).
Renders nothing.
*/}}
{{- define "llmops.gateway.exposureChecks" -}}
{{- $gateway := .Values.gateway }}
{{- $tls := $gateway.tls }}
{{- if and $tls.enabled (not (or $gateway.ingress.enabled $gateway.httpRoute.enabled)) }}
{{- fail "gateway.tls.enabled needs gateway.ingress.enabled or gateway.httpRoute.enabled" }}
{{- end }}
{{- if and $tls.certManager.enabled (not $tls.enabled) }}
{{- fail "gateway.tls.certManager.enabled needs gateway.tls.enabled" }}
{{- end }}
{{- if and $gateway.httpRoute.enabled (not $gateway.httpRoute.parentRefs) }}
{{- fail "gateway.httpRoute.parentRefs must name the Gateway(s) the route attaches to" }}
{{- end }}
{{- if $tls.enabled }}
{{- if and $gateway.ingress.enabled (not $gateway.ingress.hosts) }}
{{- fail "gateway.tls.enabled needs gateway.ingress.hosts: the certificate names its hosts" }}
{{- end }}
{{- if and $gateway.httpRoute.enabled (not $gateway.httpRoute.hostnames) }}
{{- fail "gateway.tls.enabled needs gateway.httpRoute.hostnames: the certificate names its hosts" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Host names of the gateway's certificate: the Ingress hosts and the HTTPRoute hostnames.
*/}}
{{- define "llmops.gateway.tlsHosts" -}}
{{- $hosts := list }}
{{- if .Values.gateway.ingress.enabled }}{{ $hosts = concat $hosts .Values.gateway.ingress.hosts }}{{ end }}
{{- if .Values.gateway.httpRoute.enabled }}{{ $hosts = concat $hosts .Values.gateway.httpRoute.hostnames }}{{ end }}
{{- toJson (uniq $hosts) }}
{{- end }}
