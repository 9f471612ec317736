// Start reveal.js on a lecture deck (scripts/build_slides.py), and lay it out again once
// MathJax has typeset it (formulas change the height of the slides).
// The deck is flat: the right arrow, Space and PageDown each show the next step or slide,
// so a clicker reaches every slide and every derivation step whichever key it sends.
Reveal.initialize({
  hash: true,
  width: 1280,
  height: 720,
  margin: 0.04,
  center: false,
  transition: "none",
  slideNumber: "c/t",
  navigationMode: "linear",
  plugins: [RevealNotes],
}).then(() => MathJax.startup.promise).then(() => {
  Reveal.layout();
  document.documentElement.dataset.deck = "ready";
});
