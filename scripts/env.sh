# Sourced by the entry scripts: creates .venv on first use, installs the pinned CPU stack and lcjax.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.installed-$(cat "$root/requirements.txt" "$root/setup.py" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[lcjax] setting up $venv (first run only)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r "$root/requirements.txt"
  "$venv/bin/python" -m pip install --quiet --no-deps -e "$root"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
