# Sourced by demo.sh and test.sh: puts the project's Python environment
# first on PATH, so `python3`, `pip` and the tools they install (ruff,
# pytest, the `shoal` script) are the project's own. Stock Debian and
# Ubuntu interpreters refuse `pip install` outside one (PEP 668).
#
# * Inside an active virtual environment (VIRTUAL_ENV) it is used as is.
# * SHOAL_NO_VENV=1 uses whatever `python3` is first (conda, a container).
# * Otherwise `.venv` in the project (SHOAL_VENV to put it elsewhere) is
#   made once with `python3 -m venv`.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${VIRTUAL_ENV:-}" ] || [ "${SHOAL_NO_VENV:-0}" = 1 ]; then
  :
else
  _venv="${SHOAL_VENV:-$_root/.venv}"
  if [ ! -x "$_venv/bin/python3" ]; then
    if ! python3 -m venv "$_venv" >/dev/null 2>&1; then
      # Debian ships venv's pip bootstrap separately (python3-venv).
      rm -rf "$_venv"
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
          python3-venv) >/dev/null 2>&1 || true
      fi
      python3 -m venv "$_venv" || {
        echo "cannot make a virtual environment at $_venv: install python3-venv" \
          "(Debian, Ubuntu), or set SHOAL_NO_VENV=1 to use python3 as it is" >&2
        exit 1
      }
    fi
  fi
  export VIRTUAL_ENV="$_venv"
  export PATH="$_venv/bin:$PATH"
fi
unset _root _venv
