// Grounding in answers: <ref>label</ref><box>[[x1, y1, x2, y2], ...]</box> (and <quad>) with integer
// coordinates normalised to 0-1000 over the original image. Parsing, drawing on a canvas, and rendering
// the answer text as DOM nodes (never innerHTML: answers are untrusted text).

export const SCALE = 1000;
// Same colours as ivl.processing.grounding, so the page and `ivl chat --draw` look alike.
export const PALETTE = [
  [230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
];

// The label may not cross a </ref>: "<ref>a</ref> x <ref>b</ref><box>" labels the box "b", not "a</ref> x <ref>b".
const REGION = /(?:<ref>((?:(?!<\/ref>)[\s\S])*?)<\/ref>\s*)?<(box|quad)>([\s\S]*?)<\/\2>/g;
const LIST = /\[([^\[\]]*)\]/g;
const NUMBER = /-?\d+(?:\.\d+)?/g;
const BARE_REF = /<ref>((?:(?!<\/ref>)[\s\S])*?)<\/ref>/g;

/**
 * Every <box>/<quad> group of `text`, in pixels of a width × height image.
 * A box whose four numbers sum to less than 4 is read as normalised to 0-1 (like the official RefCOCO
 * evaluation). Malformed number lists are skipped; groups without a valid shape are dropped.
 * Returns [{label, kind, shapes, start, end}] where start/end locate the match in `text`.
 */
export function parseGrounding(text, width, height, unitBoxHeuristic = true) {
  const regions = [];
  for (const match of text.matchAll(REGION)) {
    const [, label, kind, body] = match;
    const arity = kind === "box" ? 4 : 8;
    const shapes = [];
    for (const list of body.matchAll(LIST)) {
      const numbers = (list[1].match(NUMBER) || []).map(Number);
      if (numbers.length !== arity) continue;
      const sum = numbers.reduce((a, b) => a + b, 0);
      const scale = unitBoxHeuristic && kind === "box" && sum < 4 ? 1 : SCALE;
      shapes.push(numbers.map((v, i) => (v / scale) * (i % 2 === 0 ? width : height)));
    }
    if (shapes.length) {
      regions.push({
        label: label === undefined ? null : label.trim(),
        kind,
        shapes,
        start: match.index,
        end: match.index + match[0].length,
      });
    }
  }
  return regions;
}

export function colour(index, alpha = 1) {
  const [r, g, b] = PALETTE[index % PALETTE.length];
  return alpha === 1 ? `rgb(${r}, ${g}, ${b})` : `rgba(${r}, ${g}, ${b}, ${alpha})`;
}

// Black or white label text, whichever contrasts more with the palette colour (WCAG relative luminance).
function textColourOn(index) {
  const lin = PALETTE[index % PALETTE.length].map((c) => {
    const s = c / 255;
    return s <= 0.03928 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
  });
  const luminance = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2];
  return (luminance + 0.05) / 0.05 > 1.05 / (luminance + 0.05) ? "#000" : "#fff";
}

/**
 * Draw `image` on `canvas`, then each region (in pixels of the image) outlined and labelled.
 * Large images are drawn at most `maxSide` pixels on their longest side to bound the canvas memory.
 */
export function drawRegions(canvas, image, regions, maxSide = 2048) {
  const natural = [image.naturalWidth || image.width, image.naturalHeight || image.height];
  const scale = Math.min(1, maxSide / Math.max(...natural));
  const width = Math.max(1, Math.round(natural[0] * scale));
  const height = Math.max(1, Math.round(natural[1] * scale));
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0, width, height);
  const line = Math.max(2, Math.round(Math.min(width, height) / 200));
  const fontSize = Math.max(12, Math.round(Math.min(width, height) / 30));
  ctx.font = `${fontSize}px sans-serif`;
  ctx.textBaseline = "top";
  regions.forEach((region, index) => {
    ctx.strokeStyle = colour(index);
    ctx.lineWidth = line;
    for (const pixels of region.shapes) {
      const shape = pixels.map((v) => v * scale);
      const xs = shape.filter((_, i) => i % 2 === 0);
      const ys = shape.filter((_, i) => i % 2 === 1);
      ctx.beginPath();
      if (region.kind === "box") {
        const [x1, y1, x2, y2] = shape;
        ctx.rect(Math.min(x1, x2), Math.min(y1, y2), Math.abs(x2 - x1), Math.abs(y2 - y1));
      } else {
        xs.forEach((x, i) => (i ? ctx.lineTo(x, ys[i]) : ctx.moveTo(x, ys[i])));
        ctx.closePath();
      }
      ctx.stroke();
      if (region.label) {
        const x = Math.min(...xs);
        const y = Math.min(...ys);
        const boxHeight = fontSize + 2 * line;
        const boxWidth = ctx.measureText(region.label).width + 2 * line;
        const top = y - boxHeight >= 0 ? y - boxHeight : y; // above the box when there is room
        ctx.fillStyle = colour(index);
        ctx.fillRect(x, top, boxWidth, boxHeight);
        ctx.fillStyle = textColourOn(index);
        ctx.fillText(region.label, x + line, top + line);
      }
    }
  });
}

/** A text description of the regions, in pixels, for screen readers and the figure caption. */
export function describeRegions(regions) {
  return regions
    .map((region) => {
      const name = region.label || "unlabelled region";
      const shapes = region.shapes.map((s) =>
        region.kind === "box"
          ? `(${Math.round(s[0])}, ${Math.round(s[1])})–(${Math.round(s[2])}, ${Math.round(s[3])})`
          : s.map(Math.round).join(", "),
      );
      return `${name}: ${shapes.join("; ")}`;
    })
    .join(". ");
}

function appendText(parent, text) {
  // bare <ref>x</ref> (no box after it) reads as an emphasised phrase
  let last = 0;
  for (const match of text.matchAll(BARE_REF)) {
    if (match.index > last) parent.append(text.slice(last, match.index));
    const strong = document.createElement("strong");
    strong.textContent = match[1];
    parent.append(strong);
    last = match.index + match[0].length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

/**
 * Render an answer into `parent`: plain text as text nodes, each grounded region as a coloured label
 * followed by its coordinates. Incomplete tags at the end of a streaming answer stay as raw text.
 */
export function renderAnswer(parent, text) {
  parent.replaceChildren();
  // parse in 0-1000 space so the chips show the model's own numbers
  const regions = parseGrounding(text, SCALE, SCALE, false);
  let last = 0;
  regions.forEach((region, index) => {
    appendText(parent, text.slice(last, region.start));
    const mark = document.createElement("span");
    mark.className = "region";
    mark.style.setProperty("--region-colour", colour(index));
    if (region.label) {
      const label = document.createElement("strong");
      label.textContent = region.label;
      mark.append(label);
    }
    const coords = document.createElement("code");
    coords.textContent = region.shapes.map((s) => `[${s.map((v) => Number(v.toFixed(3))).join(", ")}]`).join(" ");
    mark.append(coords);
    parent.append(mark);
    last = region.end;
  });
  appendText(parent, text.slice(last));
}
