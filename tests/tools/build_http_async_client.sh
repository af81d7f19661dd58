#!/usr/bin/env bash
# Build Kamailio's http_async_client module, which no Debian package ships, from
# Debian's own source package for the installed kamailio version, with the flags
# Debian's debian/rules uses (so the module's version/compile-flags match the
# core's), install it next to Debian's modules and check that kamailio loads it.
# Idempotent: does nothing if the module is already installed.
#   build_http_async_client.sh      (as root)
set -euo pipefail

moddir=/usr/lib/x86_64-linux-gnu/kamailio/modules
mod=$moddir/http_async_client.so
log() { echo "build_http_async_client.sh: $*" >&2; }

# 1. Nothing to do if the module is there.
if [ -f "$mod" ]; then log "$mod exists"; exit 0; fi

ver=$(dpkg-query -W -f='${Version}' kamailio)   # e.g. 5.6.3-2
upstream=${ver#*:}; upstream=${upstream%-*}     # e.g. 5.6.3
work=/var/tmp/kazoo-green-http_async_client
src=$work/kamailio-$upstream
log "kamailio $ver; work dir $work"

# 2. Build tools and the module's libraries (Debian builds against libcurl4-openssl-dev).
pkgs=(dpkg-dev gcc make pkg-config bison flex libevent-dev libcurl4-openssl-dev)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
updated=
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q >&2; updated=1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# 3. Debian's source package for exactly the installed version (deb-src from the mirror).
if [ ! -d "$src" ]; then
    srcs=/etc/apt/sources.list.d/kazoo-green-src.sources
    if [ ! -f "$srcs" ]; then
        log "adding $srcs"
        printf '%s\n' 'Types: deb-src' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm' \
            'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' >"$srcs"
        updated=
    fi
    apt-cache showsrc kamailio 2>/dev/null | grep -qx "Version: $ver" \
        || [ -n "$updated" ] || apt-get update -q >&2
    log "apt-get source kamailio=$ver"
    mkdir -p "$work"
    (cd "$work" && apt-get source -q "kamailio=$ver" >&2)
fi

# 4. Configure as debian/rules' configure-stamp does, then build just this module.
export DEB_BUILD_MAINT_OPTIONS=hardening=+all   # as debian/rules
cd "$src"
if [ ! -f src/config.mak ]; then
    log "make cfg"
    make cfg quiet=verbose prefix=/usr cfg_target=/etc/kamailio/ FLAVOUR=kamailio \
        LIBDIR=lib/x86_64-linux-gnu \
        CC_EXTRA_OPTS="$(dpkg-buildflags --get CPPFLAGS) $(dpkg-buildflags --get CFLAGS) -DVERSION_NODATE" \
        LD_EXTRA_OPTS="$(dpkg-buildflags --get LDFLAGS)" >&2
fi
log "building src/modules/http_async_client"
make -C src/modules/http_async_client quiet=verbose >&2
install -m 644 src/modules/http_async_client/http_async_client.so "$mod"
log "installed $mod"

# 5. Check that Debian's kamailio loads it (version and compile flags must match).
cfg=$work/check.cfg
cat >"$cfg" <<'EOF'
#!KAMAILIO
listen=udp:127.0.0.1:5099
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "http_async_client.so"
modparam("http_async_client", "workers", 1)
request_route { t_newtran(); http_async_query("http://127.0.0.1:8080/x", "HTTP_REPLY"); }
route[HTTP_REPLY] { t_reply("$http_rs", "OK"); }
EOF
if kamailio -c -f "$cfg" >&2; then
    log "OK: kamailio -c loads http_async_client"
else
    log "FAILED: kamailio -c does not load $mod; removing it"
    rm -f "$mod"; exit 1
fi
