{{- define "armada.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "armada.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "armada.headless" -}}
{{- printf "%s-headless" (include "armada.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "armada.selectorLabels" -}}
app.kubernetes.io/name: {{ include "armada.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "armada.labels" -}}
{{ include "armada.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
armada.io/mode: {{ .Values.mode }}
{{- end -}}

{{/* The DNS name of pod i (a StatefulSet pod behind the headless service). */}}
{{- define "armada.podHost" -}}
{{- printf "%s-%d.%s.%s.svc" (include "armada.fullname" .root) .i (include "armada.headless" .root) .root.Release.Namespace -}}
{{- end -}}

{{/* id=host:port of every founding member. */}}
{{- define "armada.initialMembers" -}}
{{- $n := int .Values.initialMembers -}}
{{- if eq $n 0 }}{{ $n = int .Values.replicas }}{{ end -}}
{{- $out := list -}}
{{- range $i := until $n -}}
{{- $out = append $out (printf "%d=%s:%d" (add1 $i) (include "armada.podHost" (dict "root" $ "i" $i)) (int $.Values.ports.raft)) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{- define "armada.tlsSecret" -}}
{{- if eq .Values.tls.mode "cert-manager" -}}
{{- printf "%s-tls" (include "armada.fullname" .) -}}
{{- else -}}
{{- .Values.tls.secretName -}}
{{- end -}}
{{- end -}}

{{- define "armada.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "armada.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Checks of values that the templates rely on. */}}
{{- define "armada.validate" -}}
{{- if not (has .Values.mode (list "leader" "follower")) -}}
{{- fail (printf "mode must be leader or follower, not %q" .Values.mode) -}}
{{- end -}}
{{- if not (has .Values.tls.mode (list "none" "secret" "cert-manager")) -}}
{{- fail (printf "tls.mode must be none, secret or cert-manager, not %q" .Values.tls.mode) -}}
{{- end -}}
{{- if and (eq .Values.tls.mode "secret") (not .Values.tls.secretName) -}}
{{- fail "tls.mode secret needs tls.secretName" -}}
{{- end -}}
{{- if and (eq .Values.tls.mode "cert-manager") (not .Values.tls.certManager.issuerRef.name) -}}
{{- fail "tls.mode cert-manager needs tls.certManager.issuerRef.name" -}}
{{- end -}}
{{- if and (eq .Values.mode "follower") (not .Values.leader.address) -}}
{{- fail "a follower cluster needs leader.address (the leader cluster's replication endpoints)" -}}
{{- end -}}
{{- if lt (int .Values.replicas) 1 -}}
{{- fail "replicas must be at least 1" -}}
{{- end -}}
{{- if gt (int .Values.initialMembers) (int .Values.replicas) -}}
{{- fail "initialMembers cannot exceed replicas" -}}
{{- end -}}
{{- end -}}
