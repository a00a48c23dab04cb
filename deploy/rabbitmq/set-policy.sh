#!/bin/sh
# The capture queue's policy on RabbitMQ: its delivery limit and dead-letter exchange, the same as
# definitions.json beside this file. Run it where rabbitmqctl reaches the broker (a broker node, or
# `kubectl exec` into one); RABBITMQ_VHOST picks another virtual host, and any further arguments go to
# rabbitmqctl (e.g. -n rabbit@host). See deploy/README.md, "RabbitMQ policy".
#
# Today the worker also declares x-delivery-limit and x-dead-letter-exchange on the queue. RabbitMQ then
# uses the lower of the two delivery limits (so this can lower it in place, never raise it) and the
# queue's own dead-letter exchange. Once the worker stops declaring them, this policy alone sets them,
# and changing either is one more run of this script: no queue to delete, no frame lost.
set -eu
exec rabbitmqctl "$@" set_policy --vhost "${RABBITMQ_VHOST:-/}" --priority 10 --apply-to queues \
    inspector-captures '^inspector\.captures$' \
    '{"delivery-limit": 10, "dead-letter-exchange": "inspection.dead"}'
