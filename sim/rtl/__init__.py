"""RTL simulation: generated Verilog under Verilator, driven through cocotb."""
