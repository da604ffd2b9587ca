// A minimal stand-in for node-driver-registrar, used by scripts/k8s_e2e.sh
// only: the Go module proxy does not serve github.com/kubernetes-csi/
// node-driver-registrar, so the end-to-end script builds this instead. It
// speaks the same protocol and takes the same flags the chart passes
// (--csi-address, --kubelet-registration-path): it asks the driver its name
// over CSI (Identity.GetPluginInfo), then serves kubelet's plugin
// registration API (pluginregistration/v1) on
// /registration/<driver>-reg.sock until SIGTERM.
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	reg "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type server struct {
	reg.UnimplementedRegistrationServer
	name, endpoint string
}

func (s *server) GetInfo(ctx context.Context, _ *reg.InfoRequest) (*reg.PluginInfo, error) {
	return &reg.PluginInfo{Type: reg.CSIPlugin, Name: s.name, Endpoint: s.endpoint, SupportedVersions: []string{"1.0.0"}}, nil
}

func (s *server) NotifyRegistrationStatus(ctx context.Context, st *reg.RegistrationStatus) (*reg.RegistrationStatusResponse, error) {
	if !st.PluginRegistered {
		log.Printf("kubelet refused the registration: %s", st.Error)
		os.Exit(1)
	}
	log.Printf("registered with kubelet")
	return &reg.RegistrationStatusResponse{}, nil
}

func main() {
	csiAddress := flag.String("csi-address", "/csi/csi.sock", "the driver's socket inside this container")
	kubeletPath := flag.String("kubelet-registration-path", "", "the driver's socket on the host, as kubelet sees it")
	regDir := flag.String("plugin-registration-path", "/registration", "kubelet's plugins_registry directory inside this container")
	flag.Parse()
	if *kubeletPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}
	conn, err := grpc.NewClient("unix://"+*csiAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	var name string
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		info, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			name = info.GetName()
			break
		}
		log.Printf("waiting for the driver at %s: %v", *csiAddress, err)
		time.Sleep(time.Second)
	}
	conn.Close()
	sock := filepath.Join(*regDir, name+"-reg.sock")
	_ = os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatal(err)
	}
	g := grpc.NewServer()
	reg.RegisterRegistrationServer(g, &server{name: name, endpoint: *kubeletPath})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		g.Stop()
		_ = os.Remove(sock)
		os.Exit(0)
	}()
	log.Printf("driver %s: serving registration at %s", name, sock)
	if err := g.Serve(l); err != nil {
		log.Fatal(err)
	}
}
