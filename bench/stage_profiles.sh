# Sourced by the benchmark runners: stage_profiles DIR copies deploy/profiles into DIR, then each
# file of EXTRA_PROFILES (space-separated layer profile JSON files), which replaces a shipped
# profile of the same name (the name inside the file, which the sidecar refuses to see twice).
stage_profiles() {
  local dest=$1 root py n=0 f g name
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  py="$root/.venv/bin/python"
  mkdir -p "$dest"
  cp "$root"/deploy/profiles/*.json "$dest/"
  for f in ${EXTRA_PROFILES:-}; do
    name=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["name"])' "$f")
    for g in "$dest"/*.json; do
      if [[ $("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["name"])' "$g") == "$name" ]]; then
        rm "$g"
      fi
    done
    n=$((n + 1))
    cp "$f" "$dest/extra-$n.json"
  done
}
