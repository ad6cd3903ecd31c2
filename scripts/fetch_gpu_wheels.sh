#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/, here, where pip reaches PyPI (the GPU machine has no network).
# Its image (Python 3.12, x86-64, torch 2.11+cu130, transformers 5.17, peft of an unrecorded version) lacks
# bitsandbytes, which gpu_check.py and --load-in-4bit need; their own needs (torch, numpy, packaging) are there.
# peft comes too (pure Python, ~0.5 MB), pinned to the version the CPU tests ran with beside transformers 5.17.
# Run once, in the repo root or anywhere:   bash scripts/fetch_gpu_wheels.sh
# Then a device run carries .whl and starts with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
# The wheels are ~44 MB of the 64 MiB that a device run may carry.
# WHL_DIR=dir puts the wheels elsewhere; BNB_VERSION=x.y.z another version (checked below for a CUDA 13.0 library).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL_DIR="${WHL_DIR:-.whl}"          # ignored by .gitignore, so it travels only when a run names it in carry
BNB_VERSION="${BNB_VERSION:-0.50.2}"
PEFT_VERSION="${PEFT_VERSION:-0.21.2}"

mkdir -p "$WHL_DIR"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$WHL_DIR" "bitsandbytes==$BNB_VERSION" "peft==$PEFT_VERSION"

# one version of each package, or the install there stops
dupes=$(ls "$WHL_DIR"/*.whl | xargs -n1 basename | cut -d- -f1 | sort | uniq -d)
if [ -n "$dupes" ]; then echo "more than one version of: $dupes (in $WHL_DIR); remove the extra ones" >&2; exit 1; fi
# the GPU image's torch is built for CUDA 13.0: the wheel must ship a library for it
whl=$(ls "$WHL_DIR"/bitsandbytes-"$BNB_VERSION"-*.whl)
python3 -c 'import sys, zipfile; sys.exit(not any("libbitsandbytes_cuda130" in n for n in zipfile.ZipFile(sys.argv[1]).namelist()))' \
    "$whl" || { echo "$whl has no CUDA 13.0 library" >&2; exit 1; }
ls -l "$WHL_DIR"
