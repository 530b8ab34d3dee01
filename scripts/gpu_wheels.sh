#!/usr/bin/env bash
# Run from the project's root on a machine with network, after
# ../shared/gpu/prepare-carry.sh: fills the git-ignored .dev/whl2 with the wheels of the
# project's dependencies that the GPU machine's image lacks (pydantic for the session
# files, prompt_toolkit for the chat, isal for the chunk files' checksums; sentencepiece
# and protobuf, the tests' reference of SentencePiece tokenizers; 7 MB), for its
# Python 3.12. scripts/gpu_session.sh installs them where .dev/whl2 was carried (with
# .dev/model-b: .dev/whl and .dev/model-a fill one call's 64 MiB). Without isal the
# checksums are zlib's own (the same, slower).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
rm -rf .dev/whl2 && mkdir -p .dev/whl2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .dev/whl2 pydantic pydantic_core annotated-types typing-inspection typing_extensions \
  prompt_toolkit wcwidth isal sentencepiece protobuf 2>&1 | grep -v WARNING || true
ls .dev/whl2
