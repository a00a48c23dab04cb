#!/bin/sh
# The inspector's two queue policies on RabbitMQ, the same as definitions.json beside this file:
#   inspector-captures      the capture queue: its delivery limit and dead-letter exchange, and
#                           at-least-once dead-lettering (RabbitMQ 3.10 or later; it needs
#                           overflow reject-publish, which refuses nothing without a length limit)
#   inspector-dead-letters  the dead-letter queue: at most DEAD_LETTER_MAX_LENGTH dead letters
#                           (10000) and DEAD_LETTER_MAX_BYTES of bodies (1 GiB), the oldest dropped
# Run it where rabbitmqctl reaches the broker (a broker node, or `kubectl exec` into one);
# RABBITMQ_VHOST picks another virtual host, and any further arguments go to rabbitmqctl
# (e.g. -n rabbit@host). Running it again with other values changes them in place: no queue to
# delete, no frame lost. See deploy/README.md, "RabbitMQ policy".
#
# Today the worker also declares x-delivery-limit and x-dead-letter-exchange on the capture queue.
# RabbitMQ then uses the lower of the two delivery limits (so this can lower it in place, never raise
# it) and the queue's own dead-letter exchange. Once the worker stops declaring them, this policy
# alone sets them.
set -eu
max_length="${DEAD_LETTER_MAX_LENGTH:-10000}"
max_bytes="${DEAD_LETTER_MAX_BYTES:-1073741824}"
for bound in "DEAD_LETTER_MAX_LENGTH=$max_length" "DEAD_LETTER_MAX_BYTES=$max_bytes"; do
    case "${bound#*=}" in
        '' | 0* | *[!0-9]*)
            echo "set-policy.sh: $bound is not a positive whole number (a count, or bytes: 1073741824 for 1 GiB)" >&2
            exit 2 ;;
    esac
done
rabbitmqctl "$@" set_policy --vhost "${RABBITMQ_VHOST:-/}" --priority 10 --apply-to queues \
    inspector-captures '^inspector\.captures$' \
    '{"delivery-limit": 10, "dead-letter-exchange": "inspection.dead", "dead-letter-strategy": "at-least-once", "overflow": "reject-publish"}'
exec rabbitmqctl "$@" set_policy --vhost "${RABBITMQ_VHOST:-/}" --priority 10 --apply-to queues \
    inspector-dead-letters '^inspection\.dead$' \
    "{\"max-length\": $max_length, \"max-length-bytes\": $max_bytes, \"overflow\": \"drop-head\"}"
