#!/usr/bin/env bash
# bash scripts/install_wheels.sh DIR...: on the GPU machine (no package index), install with --no-deps every wheel in
# the folders DIR (carried with the command) whose distribution is not installed yet. The wheels are first copied to
# /tmp/wh, so wheels staged by earlier commands of the same warm machine are installed too.
mkdir -p /tmp/wh
for d in "$@"; do [ -d "$d" ] && cp "$d"/*.whl /tmp/wh/ 2>/dev/null; done
todo=()
for w in /tmp/wh/*.whl; do
  name=$(basename "$w" | cut -d- -f1)
  pip show "$name" >/dev/null 2>&1 || todo+=("$w")
done
[ ${#todo[@]} -gt 0 ] && pip install -q --no-deps --no-index "${todo[@]}" 2>&1 | tail -3
echo "installed ${#todo[@]} wheels"
