// Line charts with uPlot (a global from its deferred script): x values and named series of y values,
// sized to their container and redrawn in place when the data changes.

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c"];

export class LineChart {
  // series: [{label, points?}]; points draws markers, for sparse series such as eval losses.
  constructor(container, { series, xLabel, yLabel, time = false }) {
    this.container = container;
    const width = () => Math.max(280, container.clientWidth || 600);
    this.plot = new window.uPlot(
      {
        width: width(),
        height: 240,
        scales: { x: { time } },
        axes: [{ label: xLabel }, { label: yLabel }],
        series: [
          {},
          ...series.map((s, i) => ({
            label: s.label,
            stroke: COLORS[i % COLORS.length],
            width: 2,
            spanGaps: true,
            points: { show: Boolean(s.points) },
          })),
        ],
      },
      [[], ...series.map(() => [])],
      container,
    );
    this.resize = () => this.plot.setSize({ width: width(), height: 240 });
    window.addEventListener("resize", this.resize);
  }

  setData(x, ys) {
    this.plot.setData([x, ...ys]);
  }

  destroy() {
    window.removeEventListener("resize", this.resize);
    this.plot.destroy();
  }
}
