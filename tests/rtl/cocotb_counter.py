import cocotb

from tb import TB


@cocotb.test()
async def count(dut):
    tb = TB(dut)
    await tb.reset(2)       # two edges in reset, one after: the counter has counted once
    await tb.cycles(4)
    assert int(dut.o.value) in (4, 5), int(dut.o.value)
