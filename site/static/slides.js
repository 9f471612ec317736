// Start reveal.js on a deck built by scripts/build_slides.py, then lay it out again once
// MathJax has typeset it (formulas change the height of the slides).

// A derivation wider than the slide is zoomed out to fit, rather than cut off at the edge.
// Measured on screen (MathJax's indent included), and again after each try: formulas are
// sized in ex, which the browser rounds, so a zoom a little below 1 may change nothing.
function fitDerivations(slide) {
  const right = (box) => Math.max(
    ...[...box.querySelectorAll("svg")].map((svg) => svg.getBoundingClientRect().right));
  slide.querySelectorAll(".dpo-derivation").forEach((box) => {
    box.style.zoom = "";
    const room = box.getBoundingClientRect();
    let zoom = 1;
    while (right(box) > room.right + 1 && zoom > 0.5) {
      zoom = Math.min(zoom - 0.02, (0.99 * room.width) / (right(box) - room.left) * zoom);
      box.style.zoom = zoom.toFixed(3);
    }
  });
}

Reveal.initialize({
  hash: true,
  width: 1280,
  height: 800,
  margin: 0.03,
  center: false,
  transition: "none",
  slideNumber: "c/t",
  plugins: [RevealNotes],
}).then(() => MathJax.startup.promise).then(() => {
  Reveal.on("slidechanged", (event) => fitDerivations(event.currentSlide));
  fitDerivations(Reveal.getCurrentSlide());
  Reveal.layout();
  document.documentElement.dataset.deck = "ready";
});
