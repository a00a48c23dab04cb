"""`inspector opcua`: the latest verdict of every line and camera, served to PLCs, HMIs and MES over OPC UA.

`board` holds the state (pure, no I/O), `feed` takes results from RabbitMQ on a thread of its own,
`namespace` lays the nodes out on an asyncua server, and `bridge` runs the three together.
"""
