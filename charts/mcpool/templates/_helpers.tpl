{{/* Names, labels and shared pieces of the mcpool chart. */}}

{{- define "mcpool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mcpool.fullname" -}}
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

{{/* A name with a suffix, kept within 63 characters. */}}
{{- define "mcpool.suffixed" -}}
{{- $full := include "mcpool.fullname" .root }}
{{- printf "%s-%s" ($full | trunc (int (sub 62 (len .suffix)))) .suffix | trimSuffix "-" }}
{{- end }}

{{- define "mcpool.operatorName" -}}
{{- include "mcpool.suffixed" (dict "root" . "suffix" "operator") }}
{{- end }}

{{- define "mcpool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mcpool.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels of every object; component given by the caller. */}}
{{- define "mcpool.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "mcpool.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: mcpool
{{- end }}

{{/* The immutable selector of a workload: never add keys. The name differs from the pools'
     "mcpool" so that no selector of the chart matches a pool's pods, or the reverse. */}}
{{- define "mcpool.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-%s" (include "mcpool.name" .root) .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* image: repository[:tag][@digest]; .image the values block, .root the top context. */}}
{{- define "mcpool.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* The watched namespaces with scope "namespaced", as a JSON list (fromJsonArray to use). */}}
{{- define "mcpool.watchedNamespaces" -}}
{{- if eq .Values.watch.scope "namespaced" }}
{{- $list := .Values.watch.namespaces | default (list .Release.Namespace) }}
{{- toJson (uniq $list) }}
{{- else }}
{{- if .Values.watch.namespaces }}
{{- fail "watch.namespaces is only used with watch.scope=namespaced (scope \"cluster\" watches every namespace)" }}
{{- end }}
{{- toJson list }}
{{- end }}
{{- end }}

{{/* Checks of values that the schema cannot express; included by every template that depends on them. */}}
{{- define "mcpool.validate" -}}
{{- $ext := .Values.redis.external }}
{{- $modes := 0 }}
{{- range (list $ext.url $ext.sentinel.addresses $ext.cluster.addresses) }}{{ if . }}{{ $modes = add1 $modes }}{{ end }}{{ end }}
{{- if gt $modes 1 }}
{{- fail "redis.external: set only one of url, sentinel.addresses and cluster.addresses" }}
{{- end }}
{{- if and .Values.redis.bundled.enabled (gt $modes 0) }}
{{- fail "redis.bundled.enabled and redis.external (url, sentinel or cluster) are mutually exclusive: choose the bundled Redis or an external one" }}
{{- end }}
{{- if and $ext.sentinel.addresses (not $ext.sentinel.masterName) }}
{{- fail "redis.external.sentinel.addresses needs redis.external.sentinel.masterName (the primary the sentinels monitor)" }}
{{- end }}
{{- if and .Values.redis.bundled.existingSecret (not .Values.redis.bundled.enabled) }}
{{- fail "redis.bundled.existingSecret is set but redis.bundled.enabled is false" }}
{{- end }}
{{- if and .Values.monitoring.serviceMonitor.enabled .Values.monitoring.podMonitor.enabled }}
{{- fail "monitoring.serviceMonitor.enabled and monitoring.podMonitor.enabled both scrape the same pods: enable one" }}
{{- end }}
{{- if and .Values.cleanup.enabled (not .Values.rbac.create) }}
{{- fail "cleanup.enabled needs rbac.create (the hook Job gets its own ServiceAccount and role)" }}
{{- end }}
{{- end }}

{{/* The Redis URL of the bundled or external Redis; empty when none. */}}
{{- define "mcpool.redisURL" -}}
{{- if .Values.redis.bundled.enabled }}
{{- printf "redis://%s.%s.svc:6379/0" (include "mcpool.suffixed" (dict "root" . "suffix" "redis")) .Release.Namespace }}
{{- else }}
{{- .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* The spec.redis of a pool on the bundled or external Redis, as JSON; "{}" when none. */}}
{{- define "mcpool.redisSpec" -}}
{{- $ext := .Values.redis.external }}
{{- $redis := dict }}
{{- if .Values.redis.bundled.enabled }}
{{- $key := ternary .Values.redis.bundled.existingSecretKey "password" (ne .Values.redis.bundled.existingSecret "") }}
{{- $redis = dict "url" (include "mcpool.redisURL" .) "passwordSecretRef" (dict "name" (include "mcpool.redisSecretName" .) "key" $key) }}
{{- else if or $ext.url $ext.sentinel.addresses $ext.cluster.addresses }}
{{- if $ext.url }}
{{- $_ := set $redis "url" $ext.url }}
{{- else if $ext.sentinel.addresses }}
{{- $sentinel := dict "addresses" $ext.sentinel.addresses "masterName" $ext.sentinel.masterName }}
{{- if $ext.sentinel.db }}{{ $_ := set $sentinel "db" $ext.sentinel.db }}{{ end }}
{{- if $ext.tls }}{{ $_ := set $sentinel "tls" true }}{{ end }}
{{- if $ext.sentinel.existingSecret }}
{{- $_ := set $sentinel "passwordSecretRef" (dict "name" $ext.sentinel.existingSecret "key" $ext.sentinel.existingSecretKey) }}
{{- end }}
{{- $_ := set $redis "sentinel" $sentinel }}
{{- else }}
{{- $cluster := dict "addresses" $ext.cluster.addresses }}
{{- if $ext.tls }}{{ $_ := set $cluster "tls" true }}{{ end }}
{{- $_ := set $redis "cluster" $cluster }}
{{- end }}
{{- if $ext.existingSecret }}
{{- $_ := set $redis "passwordSecretRef" (dict "name" $ext.existingSecret "key" $ext.existingSecretKey) }}
{{- end }}
{{- end }}
{{- toJson $redis }}
{{- end }}

{{- define "mcpool.redisSecretName" -}}
{{- .Values.redis.bundled.existingSecret | default (include "mcpool.suffixed" (dict "root" . "suffix" "redis")) }}
{{- end }}

{{/* Labels of the pods the operator creates for pools (builders.labels): MCP pods and directors. */}}
{{- define "mcpool.poolPodLabels" -}}
app.kubernetes.io/name: mcpool
app.kubernetes.io/managed-by: mcpool-operator
{{- end }}

{{/* Pod and container security of the chart's own pods (restricted Pod Security Standard). */}}
{{- define "mcpool.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 10001 }}
runAsGroup: {{ .uid | default 10001 }}
{{- if .fsGroup }}
fsGroup: {{ .fsGroup }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "mcpool.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* The operator's RBAC rules (one list for the ClusterRole and for every namespaced Role;
     tests/operator/test_operator_rbac.py compares them with the calls the operator makes). */}}
{{- define "mcpool.operatorRules" -}}
# The pools: kopf watches them and keeps its finalizer and annotations on them; the operator
# reads the live status before writing it.
- apiGroups: ["mcp.mptcp.dev"]
  resources: ["mcppools"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["mcp.mptcp.dev"]
  resources: ["mcppools/status"]
  verbs: ["patch"]
# Children carry blockOwnerDeletion: the OwnerReferencesPermissionEnforcement admission plugin
# requires update on the owner's finalizers (an admission check, not an API call).
- apiGroups: ["mcp.mptcp.dev"]
  resources: ["mcppools/finalizers"]
  verbs: ["update"]
# Children are written only by server-side apply (a PATCH, authorised as "create" when it creates
# the object). Children that exist once per pool: never deleted by the operator (garbage
# collection does).
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Children whose set depends on the spec (join Services, director objects): also pruned.
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["daemonsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Pods: only read, to surface kubelet rejections (SysctlForbidden) in the pool's status.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* The cleanup hook's rules: delete the pools and watch them go. */}}
{{- define "mcpool.cleanupRules" -}}
- apiGroups: ["mcp.mptcp.dev"]
  resources: ["mcppools"]
  verbs: ["list", "delete"]
{{- end }}
