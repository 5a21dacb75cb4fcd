{{/*
The chart mirrors deploy/kustomization.yaml: its resources are the manifests rendered,
its generators the ConfigMaps and Secrets, read through the chart's symlinks to deploy/.
*/}}

{{- define "tierflow.kustomization" -}}
{{- $kz := .Files.Get "kustomization.yaml" | fromYaml -}}
{{- if or (not $kz) $kz.Error -}}
{{- fail "deploy/helm/tierflow/kustomization.yaml (a symlink to deploy/kustomization.yaml) is missing or not YAML: install the chart from a checkout" -}}
{{- end -}}
{{- toYaml $kz -}}
{{- end -}}

{{/* The labels kustomize adds (`labels: pairs`), with Helm as the manager. */}}
{{- define "tierflow.labels" -}}
{{- $kz := include "tierflow.kustomization" . | fromYaml -}}
{{- $labels := dict -}}
{{- range $l := $kz.labels -}}
{{- $labels = merge $labels $l.pairs -}}
{{- end -}}
{{- $_ := set $labels "app.kubernetes.io/managed-by" .Release.Service -}}
{{- toYaml $labels -}}
{{- end -}}

{{/*
A generator's data: key -> file content (ConfigMap) or its base64 (Secret). An entry is
`key=path` or `path` (key: the file's name), as in kustomize.
Call with (dict "gen" GENERATOR "secret" BOOL "root" $).
*/}}
{{- define "tierflow.generatorData" -}}
{{- $data := dict -}}
{{- range $entry := .gen.files -}}
{{- $parts := regexSplit "=" $entry 2 -}}
{{- $path := last $parts -}}
{{- $key := ternary (first $parts) (base $path) (eq (len $parts) 2) -}}
{{- $content := $.root.Files.Get $path -}}
{{- if not $content -}}
{{- if $.secret -}}
{{- fail (printf "secret %s: deploy/%s not found: make the secrets first (sh deploy/init-secrets.sh deploy/secrets), or set secrets.create=false" $.gen.name $path) -}}
{{- else -}}
{{- fail (printf "ConfigMap %s: deploy/%s not found" $.gen.name $path) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $data $key (ternary (b64enc $content) $content $.secret) -}}
{{- end -}}
{{- toYaml $data -}}
{{- end -}}

{{/*
Generated name -> name with a suffix from a hash of its data, as kustomize's generators
name them: a changed config or secret is a new object, so the pods using it roll.
*/}}
{{- define "tierflow.generatedNames" -}}
{{- $kz := include "tierflow.kustomization" . | fromYaml -}}
{{- $names := dict -}}
{{- range $gen := $kz.configMapGenerator -}}
{{- $data := include "tierflow.generatorData" (dict "gen" $gen "secret" false "root" $) -}}
{{- $_ := set $names $gen.name (printf "%s-%s" $gen.name (printf "ConfigMap\n%s" $data | sha256sum | trunc 10)) -}}
{{- end -}}
{{- range $gen := $kz.secretGenerator -}}
{{- $data := toJson $gen -}}
{{- if $.Values.secrets.create -}}
{{- $data = include "tierflow.generatorData" (dict "gen" $gen "secret" true "root" $) -}}
{{- end -}}
{{- $_ := set $names $gen.name (printf "%s-%s" $gen.name (printf "Secret\n%s" $data | sha256sum | trunc 10)) -}}
{{- end -}}
{{- toYaml $names -}}
{{- end -}}
