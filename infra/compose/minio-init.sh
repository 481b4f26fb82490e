#!/bin/sh
# One-shot MinIO setup for docker-compose.yml, safe to rerun: the buckets, a policy limited to
# them, and the application user (AWS_ACCESS_KEY_ID) that every Kelix client uses instead of root.
set -eu
mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
for bucket in $KELIX_BUCKETS; do
  mc mb --ignore-existing "local/$bucket"
done
mc admin policy create local kelix-buckets /kelix/minio-kelix-policy.json
mc admin user add local "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"
# `attach` fails when the policy is already attached (a rerun); accept only that case.
if ! mc admin policy attach local kelix-buckets --user "$AWS_ACCESS_KEY_ID"; then
  case "$(mc admin user info local "$AWS_ACCESS_KEY_ID")" in
    *kelix-buckets*) echo "policy kelix-buckets already attached" ;;
    *) exit 1 ;;
  esac
fi
