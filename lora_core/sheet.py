"""Contact sheets: equally sized images in rows and columns, with a label per row and per column.

Pillow only (no torch), so the page can build or read sheets without the engine. Labels use Pillow's own
default font (bundled with Pillow, no system font needed); text that does not fit is wrapped, and cut with
"..." after a few lines, so a long prompt never changes the size of the cells.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND, INK, FRAME = (255, 255, 255), (20, 20, 20), (200, 200, 200)
MAX_LABEL_LINES = 4
MIN_CELL_SIDE = 256  # smaller cells (the toy model's 64 px) are enlarged by a whole factor, with hard pixel edges


@dataclass(frozen=True)
class SheetLayout:
    """Where everything sits: cell (r, c)'s box is `box(r, c)`; the sheet is `size` pixels."""

    rows: int
    columns: int
    cell_width: int
    cell_height: int
    label_width: int  # the row labels' column, left of the cells
    top: int  # the title and the column labels, above the cells
    gap: int  # between cells, and the margin right and below

    def box(self, row: int, column: int) -> tuple[int, int, int, int]:
        left = self.label_width + column * (self.cell_width + self.gap)
        top = self.top + row * (self.cell_height + self.gap)
        return left, top, left + self.cell_width, top + self.cell_height

    @property
    def size(self) -> tuple[int, int]:
        return (self.label_width + self.columns * (self.cell_width + self.gap),
                self.top + self.rows * (self.cell_height + self.gap))


def font_size_for(cell_height: int) -> int:
    """About 1/16 of a cell, so that labels stay legible from 256 px cells to 1024 px SDXL ones."""
    return max(14, min(40, cell_height // 16))


def enlarged(cells: list[list[Image.Image]], min_side: int = MIN_CELL_SIDE) -> list[list[Image.Image]]:
    """Cells smaller than `min_side` scaled up by the smallest whole factor that reaches it, nearest-neighbour:
    a 64 px sample stays a crisp 64 px picture, large enough to see, never a blur."""
    width, height = cells[0][0].size
    factor = -(-min_side // max(1, min(width, height)))
    if factor <= 1:
        return cells
    return [[image.resize((width * factor, height * factor), Image.Resampling.NEAREST) for image in row]
            for row in cells]


def wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int,
         max_lines: int = MAX_LABEL_LINES) -> list[str]:
    """`text` in lines no wider than `width` pixels (a word longer than a line is broken), at most
    `max_lines`, the last one ending in "..." when some text was left out.

    Linear in the text: wrapping stops at the first line past `max_lines`, and a long word is cut by a binary
    search over at most `width + 1` characters (a visible character is at least a pixel wide), so a label of
    100,000 characters in one word costs a few measurements of short strings, not one per character."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        if len(lines) > max_lines:
            break  # the rest would be cut anyway
        candidate = f"{line} {word}" if line else word
        if len(candidate) <= width + 1 and font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while len(lines) <= max_lines and len(word) > 1 and font.getlength(word[:width + 1]) > width:
            cut = _longest_fitting(word[:width + 1], font, width)
            lines.append(word[:cut])
            word = word[cut:]
        line = word[:width + 1]
    if line or not lines:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def _longest_fitting(word: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> int:
    """The longest prefix of `word` no wider than `width` (at least one character), by binary search."""
    low, high = 1, len(word)  # word[:low] is kept even when one character is wider than the line
    while low < high:
        middle = (low + high + 1) // 2
        if font.getlength(word[:middle]) <= width:
            low = middle
        else:
            high = middle - 1
    return low


def compose(cells: list[list[Image.Image]], row_labels: list[str], column_labels: list[str],
            title: str = "") -> tuple[Image.Image, SheetLayout]:
    """One RGB image of `cells` (rows of equally sized images) with their labels, and its layout."""
    if not cells or not cells[0]:
        raise ValueError("a sheet needs at least one cell")
    if len(row_labels) != len(cells) or any(len(row) != len(column_labels) for row in cells):
        raise ValueError(f"{len(cells)} rows of {[len(row) for row in cells]} cells do not match "
                         f"{len(row_labels)} row labels and {len(column_labels)} column labels")
    width, height = cells[0][0].size
    if any(image.size != (width, height) for row in cells for image in row):
        raise ValueError("every cell of a sheet must have the same size")
    cells = enlarged(cells)
    width, height = cells[0][0].size
    font = ImageFont.load_default(size=font_size_for(height))
    line_height = int(font.size * 1.25)
    pad = max(4, font.size // 2)
    label_text_width = max(width, 96)
    row_lines = [wrap(label, font, label_text_width) for label in row_labels]
    column_lines = [wrap(label, font, width) for label in column_labels]
    title_lines = wrap(title, font, max(width * len(column_labels), 200), max_lines=2) if title else []
    widest = max(font.getlength(line) for lines in row_lines for line in lines)
    label_width = int(min(widest, label_text_width)) + 2 * pad
    title_height = len(title_lines) * line_height + pad if title_lines else 0
    header_height = max(len(lines) for lines in column_lines) * line_height + pad
    layout = SheetLayout(len(cells), len(column_labels), width, height, label_width,
                         pad + title_height + header_height, pad)

    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, line in enumerate(title_lines):
        draw.text((pad, pad + index * line_height), line, fill=INK, font=font)
    for column, lines in enumerate(column_lines):
        left = layout.box(0, column)[0]
        for index, line in enumerate(lines):
            draw.text((left, pad + title_height + index * line_height), line, fill=INK, font=font)
    for row, lines in enumerate(row_lines):
        top = layout.box(row, 0)[1]
        for index, line in enumerate(lines):
            draw.text((pad, top + index * line_height), line, fill=INK, font=font)
        for column, image in enumerate(cells[row]):
            left, top, right, bottom = layout.box(row, column)
            draw.rectangle((left - 1, top - 1, right, bottom), outline=FRAME)
            sheet.paste(image.convert("RGB"), (left, top))
    return sheet, layout
