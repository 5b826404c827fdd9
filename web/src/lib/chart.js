// Axis labels for the dashboard's charts.

// timeLabel is a unix time in seconds as the viewer's HH:MM (HH:MM:SS
// for spans under five minutes, where minutes alone would repeat).
export function timeLabel(unix, span) {
  const d = new Date(unix * 1000)
  const pad = (n) => String(n).padStart(2, '0')
  const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`
  return span < 300 ? `${hm}:${pad(d.getSeconds())}` : hm
}

// yTicks are the values labelled on the vertical axis: 0, half and the top.
export function yTicks(top) {
  return [0, top / 2, top]
}
