"""First rows of the four circulant +-1 matrices behind the Hadamard orders 156 = 4*39 and 172 = 4*43.

Found by our own search, `python tools/find_williamson.py 39 43` (under a second on one core), never
copied from tables: `fxpress.runtime.hadamard` plugs them into their array and checks H H^T = k I
before use.
- 172: Williamson matrices of order 43 (symmetric circulants, constant on the orbits of the order-6
  multiplier group of Z_43), for the Williamson array;
- 156: four circulants of order 39 with sum X X^T = 156 I (T-sequences of length 13 from base
  sequences BS(7, 6), times Williamson matrices of order 3), for the Goethals-Seidel array.
"""

from __future__ import annotations

# order -> (array, first rows of A, B, C, D as "+"/"-" strings)
CIRCULANT_ROWS: dict[int, tuple[str, tuple[str, str, str, str]]] = {
    156: (
        "goethals-seidel",
        (
            "--+-+++--+++-+-+++-+-+-+-+++++++++---++",
            "+--+-+++-+++++-++-+-++-+--+--+++-----+-",
            "-----++-+---++-++-----+-++++-+++--+++-+",
            "++-+--+---++--++--+----+++----+--+--+++",
        ),
    ),
    172: (
        "williamson",
        (
            "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
            "++-++++++----+-+--++-++-++--+-+----++++++-+",
            "+---++--++++-+-+++-++--++-+++-+-++++--++---",
            "--+++----+-++-++--++++++++--++-++-+----+++-",
        ),
    ),
}
