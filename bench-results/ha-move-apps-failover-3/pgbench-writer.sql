INSERT INTO lt_writes (id, client) VALUES (:base + nextval('lt_pgbench_ids'), :client) RETURNING id \gset
\shell echo ok :id 0
\sleep 10 ms
