# Every call below has one wrong literal; a type checker must report each line.
from vmsgamp import MsgFifo, Region

region = Region.memfd(1 << 20)
MsgFifo(region, role="drvier")            # expect: role
MsgFifo(region, layout="c")               # expect: layout
MsgFifo(region, header="g3")              # expect: header
MsgFifo(region, placement="0/8k")         # expect: placement
