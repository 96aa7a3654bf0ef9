# Shared by scripts/test and scripts/train: create or reuse .venv and install the project with
# the extras named in $EXTRAS. Reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ADAMJAX_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
if [ ! -x "$venv/bin/python" ]; then
  echo "creating virtual environment $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.adamjax-installed-$EXTRAS"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing adamjax[$EXTRAS] into $venv (log: $venv/pip.log)" >&2
  if ! { "$venv/bin/python" -m pip install --upgrade pip &&
         "$venv/bin/python" -m pip install -e "$root[$EXTRAS]"; } >"$venv/pip.log" 2>&1; then
    tail -n 40 "$venv/pip.log" >&2
    echo "pip install failed; the whole log is $venv/pip.log" >&2
    exit 1
  fi
  echo "$want" >"$stamp"
fi
export PATH="$venv/bin:$PATH"
