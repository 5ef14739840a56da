#!/bin/sh
# Render Redis's ACL file from the rules in users.acl and one password file per user.
#   sh render-acl.sh TEMPLATE SECRETS_DIR OUT [COMMAND ARGS...]
# For each `user NAME … on …` line, SECRETS_DIR/redis-NAME-password (trailing newlines dropped) is added
# as `#<sha256>`, so the rendered file holds no plaintext password. A missing file leaves that user
# without a password (nobody can log in as it) and says so. Then COMMAND is exec'd (redis-server …).
set -eu
template=$1 secrets=$2 out=$3
shift 3
umask 077
tmp="$out.tmp.$$"
: > "$tmp"
while IFS= read -r line || [ -n "$line" ]; do
    case $line in
        "user "*" on "*)
            name=${line#user }
            name=${name%% *}
            file="$secrets/redis-$name-password"
            if [ -s "$file" ]; then
                hash=$(tr -d '\r\n' < "$file" | sha256sum | cut -d' ' -f1)
                printf '%s #%s\n' "$line" "$hash" >> "$tmp"
            else
                echo "render-acl: no $file: user $name cannot log in" >&2
                printf '%s\n' "$line" >> "$tmp"
            fi
            ;;
        "user "*) printf '%s\n' "$line" >> "$tmp" ;;
        *) ;;  # comments and blank lines stay in the template
    esac
done < "$template"
mv "$tmp" "$out"
[ $# -eq 0 ] || exec "$@"
