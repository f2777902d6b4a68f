#!/bin/sh
# Runs once, when the PostgreSQL volume of docker-compose.yaml is first initialised: a second
# database beside Airflow's for synthval's results store (SYNTHVAL_RESULTS_DB_URL), owned by its
# own role, so that results survive an `airflow db reset` and Airflow's user cannot touch them.
set -eu
psql -v ON_ERROR_STOP=1 -v pw="${SYNTHVAL_RESULTS_DB_PASSWORD:?}" \
    --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE synthval LOGIN PASSWORD :'pw';
CREATE DATABASE synthval_results OWNER synthval;
REVOKE ALL ON DATABASE synthval_results FROM PUBLIC;
SQL
