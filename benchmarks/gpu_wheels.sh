#!/bin/sh
# Wheels the device machine's image lacks (its python3 3.12 has torch, accelerate, safetensors,
# tokenizers, protobuf, psutil, uvloop, msgpack; not transformers 5.24, hivemind, bitsandbytes),
# fetched here for `run` to carry (git-ignored via .git/info/exclude). A call carries at most 64 MiB,
# so two sets, one per device run:
#   sh benchmarks/gpu_wheels.sh        -> .whl/      transformers + hivemind and its needs (~30 MB)
#   sh benchmarks/gpu_wheels.sh quant  -> .whl-bnb/  transformers + bitsandbytes (~58 MB)
set -e
dest=.whl
specs="transformers==5.24.0 huggingface_hub==2.4.0"
if [ "$1" = quant ]; then
  dest=.whl-bnb
  specs="$specs bitsandbytes==0.50.2"
else
  specs="$specs hivemind==1.1.12 base58==2.1.1 ConfigArgParse==1.9.0 netaddr==1.3.0
    py-cid==0.5.0 py-multihash==3.0.0 morphys==1.0 pydantic==2.14.4
    pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 sortedcontainers==2.4.0
"
fi
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx "/$dest/" "$exclude" 2>/dev/null || echo "/$dest/" >> "$exclude"
mkdir -p "$dest"
for spec in $specs; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$dest" "$spec" 2>/dev/null || echo "no wheel for $spec"
done
if [ "$1" != quant ]; then  # pure-Python packages published as sources only: built into wheels here
  python3 -m pip wheel -q --no-deps -w "$dest" python-baseconv==1.2.2 varint==1.0.2 prefetch_generator==1.0.3 2>/dev/null
fi
du -sh "$dest"
