#!/usr/bin/env bash
# Fill the ignored folders a device call carries (docs/gpu.md "Carried to the device"), on this
# machine, from PyPI and ../shared: .whl (the packages the device image lacks, for its Python 3.12)
# and .benchmodel/shared (the tokenizers and stories260K the tests and benchmarks read; DeepSeek's
# tokenizer left out to stay under the 64 MiB a call carries). The generated gRPC code (tandem/v1,
# tandem/smg, tandem/ext_proc, openengine) comes from scripts/setup.sh. Idempotent.
#   bash benchmarks/device_carry.sh            then carry: .whl tandem/v1 tandem/smg tandem/ext_proc openengine .benchmodel
#   NIXL=1 bash benchmarks/device_carry.sh     also .nixlwhl (nixl-cu13 + nixl, slimmed to ~29 MiB)
#   NIXL=1 TOKENIZERS=qwen3 bash benchmarks/device_carry.sh   ... with one tokenizer: all of it fits one call
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all:
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64)
mkdir -p .whl
# pyproject.toml's pins of what the image lacks (llguidance, grpcio-*, OpenTelemetry), plus the
# OpenTelemetry parts those pull in, at the same release train's versions
mapfile -t wheels < <(python3 - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pins = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", d).groups() for d in deps if "==" in d)
for name, version in pins.items():
    if name == "llguidance" or name.startswith(("grpcio-", "opentelemetry-")):
        print(f"{name}=={version}")
core, contrib = pins["opentelemetry-api"], pins["opentelemetry-instrumentation-grpc"]
for name in ("opentelemetry-proto", "opentelemetry-exporter-otlp-proto-common"):
    print(f"{name}=={core}")
for name in ("opentelemetry-instrumentation", "opentelemetry-semantic-conventions", "opentelemetry-util-http"):
    print(f"{name}=={contrib}")
PY
)
"${PIP[@]}" -d .whl "${wheels[@]}"
"${PIP[@]}" -d .whl py-spy==0.4.3  # split_profile_run.sh samples the services with it
if [ ! -d .benchmodel/shared ]; then
  mkdir -p .benchmodel/shared
  cp -r ../shared/. .benchmodel/shared/
  rm -rf .benchmodel/shared/tokenizers/deepseek-v3
fi
# TOKENIZERS="qwen3": keep only those tokenizers (a call that also carries .nixlwhl); unset: all
# but DeepSeek's (those left out before are copied back)
for dir in ../shared/tokenizers/*/; do
  name=$(basename "$dir")
  if [ -n "${TOKENIZERS:-}" ] && [[ " $TOKENIZERS " != *" $name "* ]]; then
    rm -rf ".benchmodel/shared/tokenizers/$name"
  elif [ -z "${TOKENIZERS:-}" ] && [ "$name" = deepseek-v3 ]; then
    rm -rf ".benchmodel/shared/tokenizers/$name"
  elif [ ! -d ".benchmodel/shared/tokenizers/$name" ]; then
    cp -r "$dir" ".benchmodel/shared/tokenizers/$name"
  fi
done
if [ "${NIXL:-0}" = 1 ]; then
  mkdir -p .nixlwhl
  "${PIP[@]}" -d .nixlwhl nixl-cu13 nixl
  # The nixl-cu13 wheel (59 MB) and the tracked tree (8 MB) would not fit a call's 64 MiB: drop its
  # expert-parallel extension (nixl_ep_cu13: three torch builds of one library, 28 MB) and its
  # example programs, which the KV transfer never loads; RECORD loses their lines.
  python3 - .nixlwhl/nixl_cu13-*.whl <<'PY'
import sys, zipfile
path = sys.argv[1]
dropped = ("nixl_ep_cu13/", "nixl_cu13.scripts/")
with zipfile.ZipFile(path) as src:
    if not any(i.filename.startswith(dropped) for i in src.infolist()):
        sys.exit(0)  # (slimmed already)
    entries = [(i, src.read(i)) for i in src.infolist() if not i.filename.startswith(dropped)]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
    for info, data in entries:
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not line.startswith(dropped)).encode()
        out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
PY
fi
du -sh .whl .benchmodel ${NIXL:+.nixlwhl} 2>/dev/null
