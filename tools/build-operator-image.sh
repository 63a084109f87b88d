#!/usr/bin/env bash
# Build the operator image without a container engine: a Debian bookworm rootfs (debootstrap) with this repository's
# operator installed in /opt/llmops, written as an OCI image layout (umoci) with the Dockerfile's user, entrypoint
# and command. For machines with no Docker daemon; the release workflow builds the real image from
# docker/operator.Dockerfile (its base is python:3.11-slim-bookworm, this one Debian's own python3 3.11).
#
#   sudo tools/build-operator-image.sh [OUT]     # OUT defaults to /tmp/llmops-image; needs root, debootstrap, umoci
#
# Then OUT/oci holds the image (tag 0.1.0): `skopeo copy oci:OUT/oci:0.1.0 docker://<registry>/llmops-operator:0.1.0`
# pushes it. To run its entrypoint against a cluster without a runtime (docs/install.md, *Images*):
#   umoci unpack --image OUT/oci:0.1.0 OUT/run
#   chroot --userspec=65532:65532 OUT/run/rootfs env -i PATH=/usr/local/bin:/usr/bin:/bin KUBECONFIG=<in rootfs> llmops run
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-/tmp/llmops-image}
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
UID_GID=65532   # the chart's runAsUser / runAsGroup
# The wheels are built by this machine's python3 and installed by bookworm's: both must be 3.11.
python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "python3 must be 3.11 (bookworm's)" >&2; exit 1; }
for tool in debootstrap umoci; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install $tool" >&2; exit 1; }
done

rootfs="$OUT/rootfs"
rm -rf "$OUT" && mkdir -p "$OUT"
# The Debian mirror this machine's apt already uses (DEBIAN_MIRROR overrides it).
mirror=${DEBIAN_MIRROR:-$(grep -rhoE '^(URIs:|deb) +[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ \
  2>/dev/null | awk '{print $2}' | head -n1)}
[ -n "$mirror" ] || { echo "no Debian mirror in /etc/apt sources: set DEBIAN_MIRROR" >&2; exit 1; }
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
  "$mirror" >"$OUT/debootstrap.log"

# Wheels are resolved here (this machine's pip, its index and certificates), then installed offline in the rootfs.
python3 -m pip wheel -q -w "$rootfs/wheels" .
chroot "$rootfs" /usr/bin/env -i PATH=/usr/bin:/bin sh -c \
  'python3 -m venv /opt/llmops && /opt/llmops/bin/pip install -q --no-cache-dir --no-index --find-links /wheels llmops'
ln -sf /opt/llmops/bin/llmops "$rootfs/usr/local/bin/llmops"
# A passwd entry for the numeric user: kopf names itself after the user when POD_ID is not set.
echo "llmops:x:$UID_GID:" >>"$rootfs/etc/group"
echo "llmops:x:$UID_GID:$UID_GID::/nonexistent:/usr/sbin/nologin" >>"$rootfs/etc/passwd"
rm -rf "$rootfs/wheels" "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

umoci init --layout "$OUT/oci"
umoci new --image "$OUT/oci:build"
umoci unpack --image "$OUT/oci:build" "$OUT/bundle" >/dev/null
cp -a "$rootfs/." "$OUT/bundle/rootfs/"
umoci repack --image "$OUT/oci:build" "$OUT/bundle"
umoci config --image "$OUT/oci:build" --tag "$VERSION" --config.user "$UID_GID:$UID_GID" \
  --config.entrypoint llmops --config.cmd run \
  --config.env PYTHONUNBUFFERED=1 --config.env PYTHONDONTWRITEBYTECODE=1 \
  --config.exposedports 8080/tcp --config.exposedports 9090/tcp
rm -rf "$OUT/bundle"
umoci stat --image "$OUT/oci:$VERSION"
echo "image: $OUT/oci:$VERSION"
