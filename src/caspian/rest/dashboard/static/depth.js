// The depth chart: cumulative size against price, bids left of the spread and
// asks right of it, drawn as steps on a canvas.

import { cumulative } from "./book.js";

const BID = "#2fa36b";
const ASK = "#d9534f";
const AXIS = "#8a93a6";

function formatPrice(price) {
  return price.toLocaleString(undefined, { maximumFractionDigits: 8 });
}

export function drawDepth(canvas, bids, asks) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, width, height);
  if (bids.length === 0 && asks.length === 0) {
    return;
  }
  const bidSteps = cumulative(bids);
  const askSteps = cumulative(asks);
  const prices = [...bids, ...asks].map(([price]) => price);
  const low = Math.min(...prices);
  const high = Math.max(...prices);
  const top = Math.max(bidSteps.at(-1)?.[1] ?? 0, askSteps.at(-1)?.[1] ?? 0);
  const labelHeight = 14;
  const plotHeight = height - labelHeight;
  const span = high - low || 1;
  const x = (price) => ((price - low) / span) * (width - 2) + 1;
  const y = (total) => plotHeight - (total / top) * (plotHeight - 4);

  // Each side starts at zero at its best price and climbs away from the spread.
  const side = (steps, colour) => {
    if (steps.length === 0) {
      return;
    }
    context.beginPath();
    context.moveTo(x(steps[0][0]), plotHeight);
    let previous = 0;
    for (const [price, total] of steps) {
      context.lineTo(x(price), y(previous));
      context.lineTo(x(price), y(total));
      previous = total;
    }
    const edge = steps === bidSteps ? low : high;
    context.lineTo(x(edge), y(previous));
    context.lineTo(x(edge), plotHeight);
    context.closePath();
    context.fillStyle = `${colour}55`;
    context.fill();
    context.strokeStyle = colour;
    context.lineWidth = 1.5;
    context.stroke();
  };
  side(bidSteps, BID);
  side(askSteps, ASK);

  context.fillStyle = AXIS;
  context.font = "11px system-ui, sans-serif";
  context.textBaseline = "bottom";
  context.textAlign = "left";
  context.fillText(formatPrice(low), 2, height);
  context.textAlign = "right";
  context.fillText(formatPrice(high), width - 2, height);
  context.textAlign = "right";
  context.textBaseline = "top";
  context.fillText(`Σ ${top.toLocaleString(undefined, { maximumFractionDigits: 4 })}`, width - 2, 2);
}
