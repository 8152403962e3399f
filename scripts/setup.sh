#!/usr/bin/env bash
# Set up this checkout for the suite: the Python package with its extras, and the offline data it uses.
#   bash scripts/setup.sh test   -> test + metrics extras (what CI runs)
#   bash scripts/setup.sh demo   -> the same, plus Fashion-MNIST for the embedded default job
# Torch: pip takes whatever torch your index serves (on our CPU machines, the cached 2.14.1 build).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-test}"
python3 -m pip install -q --disable-pip-version-check -e ".[test,metrics]"
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${FASHION_MNIST_DIR:-}" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "setup: could not install dataset-fashion-mnist; set FASHION_MNIST_DIR to a folder with the four idx files" >&2
  else
    echo "setup: Fashion-MNIST not found; install Debian's dataset-fashion-mnist or set FASHION_MNIST_DIR" >&2
  fi
fi
if [ "$mode" != "test" ] && [ "$mode" != "demo" ]; then
  echo "setup: unknown mode '$mode' (test or demo)" >&2; exit 2
fi
