#!/bin/sh
# Creates one database per service in the single Postgres instance (docker-compose.yml).
# The postgres image runs this once, when the data volume is empty, as POSTGRES_USER.
set -eu
for db in mlflow prefect; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\""
done
