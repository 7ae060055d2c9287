#!/usr/bin/env bash
# Private apt for Debian suites the system does not track (trixie, sid, bookworm-backports).
# Never touches the system's apt sources or state: lists, archives and status live under the cache.
#
#   scripts/debian-apt.sh download SUITE DESTDIR PKG...   # .debs of exactly these packages
#   scripts/debian-apt.sh closure  SUITE DESTDIR PKG...   # .debs of the packages and their arm64 dependency closure
#   scripts/debian-apt.sh version  SUITE PKG              # candidate version
#   scripts/debian-apt.sh depends  SUITE PKG              # names of the candidate's direct Depends, one a line
set -euo pipefail

CACHE="${ACCORDION_CACHE:-$HOME/.cache/accordion}"

mirror() {
    # The URIs: line of the system's deb822 sources (not the commented snapshot lines).
    local m
    m=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)
    if [ -z "$m" ]; then
        m=$(grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n1 || true)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

setup_suite() {
    local suite=$1 dir="$CACHE/apt/$1"
    mkdir -p "$dir/lists/partial" "$dir/archives/partial"
    local line="deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(mirror) $suite main"
    if [ ! -f "$dir/sources.list" ] || [ "$(cat "$dir/sources.list")" != "$line" ]; then
        echo "$line" > "$dir/sources.list"
        rm -f "$dir/updated"
    fi
    : > "$dir/empty-status"
    APT=(apt-get -q -o APT::Sandbox::User=root -o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
         -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache::Archives=$dir/archives"
         -o APT::Architectures::=amd64 -o APT::Architectures::=arm64)
    # Refresh the index at most once a day; the cache key of what we build is the package version anyway.
    if [ ! -f "$dir/updated" ] || [ -n "$(find "$dir/updated" -mmin +1440)" ]; then
        echo ">> apt update ($suite)" >&2
        "${APT[@]}" update >&2
        touch "$dir/updated"
    fi
}

cmd=${1:-}; shift || true
case "$cmd" in
download)
    suite=$1 dest=$2; shift 2
    setup_suite "$suite"
    mkdir -p "$dest"
    (cd "$dest" && "${APT[@]}" download "$@" >&2)
    ;;
closure)
    suite=$1 dest=$2; shift 2
    setup_suite "$suite"
    dir="$CACHE/apt/$suite"
    "${APT[@]}" -o "Dir::State::Status=$dir/empty-status" -o APT::Architecture=arm64 \
        install -d -y --no-install-recommends "$@" >&2
    mkdir -p "$dest"
    cp -u "$dir"/archives/*.deb "$dest"/
    ;;
version)
    suite=$1 pkg=$2
    setup_suite "$suite"
    "${APT[@]/apt-get/apt-cache}" policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}'
    ;;
depends)
    suite=$1 pkg=$2
    setup_suite "$suite"
    "${APT[@]/apt-get/apt-cache}" depends "$pkg" 2>/dev/null \
        | awk '$1 == "Depends:" || $1 == "|Depends:" {sub(/:[a-z0-9]+$/, "", $2); print $2}'
    ;;
*)
    echo "usage: $0 {download|closure} SUITE DESTDIR PKG... | {version|depends} SUITE PKG" >&2
    exit 2
    ;;
esac
