#!/usr/bin/env bash
# Fill the ignored folders a device call carries (docs/gpu.md "Carried to the device"), on this
# machine, from PyPI and ../shared: .whl (the packages the device image lacks, for its Python 3.12)
# and .benchmodel/shared (the tokenizers and stories260K the tests and benchmarks read; DeepSeek's
# tokenizer left out to stay under the 64 MiB a call carries). The generated gRPC code (tandem/v1,
# tandem/smg, tandem/ext_proc, openengine) comes from scripts/setup.sh. Idempotent.
#   bash benchmarks/device_carry.sh            then carry: .whl tandem/v1 tandem/smg tandem/ext_proc openengine .benchmodel
#   NIXL=1 bash benchmarks/device_carry.sh     also .nixlwhl (nixl-cu13 + nixl, ~56 MiB: a call of its own)
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
if [ "${NIXL:-0}" = 1 ]; then
  mkdir -p .nixlwhl
  "${PIP[@]}" -d .nixlwhl nixl-cu13 nixl
fi
du -sh .whl .benchmodel ${NIXL:+.nixlwhl} 2>/dev/null
